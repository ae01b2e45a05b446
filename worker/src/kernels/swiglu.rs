//! SwiGLU pieces: `silu(a) ⊙ b`, the gate of both the FFN (`silu(fc1 x) ⊙ gate x`) and gated
//! retention (`silu(g) ⊙ o`).

use rayon::prelude::*;

use super::simd::exp_inline;
use super::PAR_TASK;

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `a ← silu(a) ⊙ b`, vectorised ([`exp_inline`], within 2e-7 of libm's e^x) and, over a whole
/// prompt chunk's FFN, split across threads: with libm's scalar expf on one thread this was
/// 6 % of a prefill.
pub fn silu_mul(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    if super::parallel(a.len()) {
        a.par_chunks_mut(PAR_TASK).zip(b.par_chunks(PAR_TASK)).for_each(|(a, b)| silu_mul_serial(a, b));
    } else {
        silu_mul_serial(a, b);
    }
}

multiversion! {
    fn silu_mul_serial(a: &mut [f32], b: &[f32]) {
        for (a, &b) in a.iter_mut().zip(b) {
            let x = *a;
            *a = x / (1.0 + exp_inline(-x)) * b;
        }
    }
}

/// `log σ(x)`, stable for large |x|.
#[inline]
pub fn log_sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_definitions() {
        for &x in &[-30.0f32, -3.0, -0.5, 0.0, 0.7, 4.0, 30.0] {
            let sig = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!((silu(x) as f64 - x as f64 * sig).abs() < 1e-6 * (1.0 + x.abs() as f64));
            assert!((log_sigmoid(x) as f64 - sig.ln()).abs() < 1e-6 * (1.0 + x.abs() as f64));
        }
        // The vectorised product, short and long enough to be split across threads, against
        // the definition in f64 (including both saturated ends).
        for n in [2usize, 17, 5 * PAR_TASK + 3] {
            let a0: Vec<f32> = (0..n).map(|i| ((i * 7919) % 2001) as f32 * 0.06 - 60.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 104_729) % 997) as f32 * 0.004 - 2.0).collect();
            let mut a = a0.clone();
            silu_mul(&mut a, &b);
            for ((&got, &x), &y) in a.iter().zip(&a0).zip(&b) {
                let x = x as f64;
                let want = x / (1.0 + (-x).exp()) * y as f64;
                assert!((got as f64 - want).abs() <= 1e-6 * (want.abs() + 1e-6), "silu({x})·{y}: {got} vs {want}");
            }
        }
    }
}
