//! SwiGLU pieces: `silu(a) ⊙ b`, the gate of both the FFN (`silu(fc1 x) ⊙ gate x`) and gated
//! retention (`silu(g) ⊙ o`).

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `a ← silu(a) ⊙ b`.
pub fn silu_mul(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (a, &b) in a.iter_mut().zip(b) {
        *a = silu(*a) * b;
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
        let mut a = vec![1.0, -2.0];
        silu_mul(&mut a, &[2.0, 3.0]);
        assert!((a[0] - 2.0 * silu(1.0)).abs() < 1e-7 && (a[1] - 3.0 * silu(-2.0)).abs() < 1e-7);
    }
}
