//! CPU kernels, one family per file, each named after the math and tested against a plain
//! reference implementation in the same file.

#[macro_use]
mod simd;
#[cfg(target_arch = "x86_64")]
mod attend_avx2;
#[cfg(target_arch = "x86_64")]
mod attend_avx512;
pub mod cross_attention;
pub mod embedding;
pub mod kv_block;
pub mod log_softmax;
pub mod matmul;
pub mod matmul_bf16;
#[cfg(target_arch = "x86_64")]
mod matmul_outer;
pub mod retention;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;
pub mod widen;
pub mod window_attention;

pub use simd::{axpy, dot, scale_in_place};

#[cfg(test)]
pub(crate) mod testutil {
    use rand::{Rng, SeedableRng};

    pub fn randn(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Asserts |a−b| ≤ tol·(|b| + rms(b)) elementwise: relative error, with the vector's rms as
    /// the floor so that elements near zero are judged against the data's scale.
    pub fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths differ");
        let rms = (b.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / b.len().max(1) as f64).sqrt() as f32;
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            let err = (x - y).abs() / (y.abs() + rms + f32::MIN_POSITIVE);
            assert!(err <= tol && x.is_finite(), "{what}: index {i}: {x} vs {y} (rel err {err} > {tol})");
        }
    }
}
