//! The log-softmax normaliser `ln Σ e^v` of a row of logits, one pass of vector exponentials
//! summed in f64: what every sampled token's log-probability needs, so it runs once per
//! sequence per step over the whole vocabulary.

use super::simd::exp_inline;

/// Running maxima kept side by side (a loop that vectorises).
const LANES: usize = 16;

multiversion! {
    /// The largest value; NaNs are never the largest, and an empty or all-NaN row gives −∞.
    pub fn max(x: &[f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for (m, &v) in lanes.iter_mut().zip(c) {
                *m = if v > *m { v } else { *m };
            }
        }
        lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
    }
}

/// Terms summed in f32 lanes before they join the f64 total: few enough that the f32 sums'
/// rounding stays near the exponential's own error (each lane adds BLOCK / LANES terms ≤ 1).
const BLOCK: usize = 256;

multiversion! {
    /// Σ e^(x[i] − shift), each term from [`exp_inline`] (relative error ≤ 2e-7), summed in f32
    /// lanes over blocks of [`BLOCK`] and across blocks in f64.
    pub fn sum_exp(x: &[f32], shift: f32) -> f64 {
        let mut total = 0f64;
        for block in x.chunks(BLOCK) {
            let mut acc = [0f32; LANES];
            let chunks = block.chunks_exact(LANES);
            let tail = chunks.remainder();
            for c in chunks {
                for (a, &v) in acc.iter_mut().zip(c) {
                    *a += exp_inline(v - shift);
                }
            }
            total += acc.iter().map(|&a| a as f64).sum::<f64>();
            total += tail.iter().map(|&v| exp_inline(v - shift) as f64).sum::<f64>();
        }
        total
    }
}

/// `ln Σ e^v`, shifted by the largest logit so that no term overflows. Its error is at most
/// about 2e-7 (the exponential's relative error) beside [`log_sum_exp_reference`].
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let m = max(logits);
    m as f64 + sum_exp(logits, m).ln()
}

/// The same with libm's exponential in f64: the reference.
pub fn log_sum_exp_reference(logits: &[f32]) -> f64 {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    m as f64 + logits.iter().map(|&v| ((v - m) as f64).exp()).sum::<f64>().ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::randn;

    #[test]
    fn matches_the_reference_at_every_length_and_scale() {
        for n in [1usize, 7, 16, 17, 1000, 100_288] {
            for scale in [1e-3f32, 1.0, 30.0] {
                let x: Vec<f32> = randn(n, n as u64).iter().map(|v| v * scale).collect();
                let (got, want) = (log_sum_exp(&x), log_sum_exp_reference(&x));
                assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "n={n} scale={scale}: {got} vs {want}");
                assert_eq!(max(&x), x.iter().cloned().fold(f32::NEG_INFINITY, f32::max), "n={n}");
            }
        }
    }

    #[test]
    fn shifts_by_the_largest_and_ignores_nans_for_the_maximum() {
        // Without the shift e^1000 would overflow.
        let x = [1000.0f32, 1000.0, -5.0];
        assert!((log_sum_exp(&x) - (1000.0 + 2f64.ln())).abs() < 1e-9);
        let mut y = vec![0.0f32; 40];
        y[3] = f32::NAN;
        y[33] = 2.0;
        assert_eq!(max(&y), 2.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(max(&[f32::NAN]), f32::NEG_INFINITY);
        // Terms below f32's normal range are 0, so a row of one huge and many tiny logits is
        // the huge one.
        let z = [0.0f32, -200.0, -300.0];
        assert_eq!(log_sum_exp(&z), 0.0);
    }
}
