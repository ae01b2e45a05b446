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
mod matmul_amx;
pub mod matmul_bf16;
mod matmul_bf16_rows;
#[cfg(target_arch = "x86_64")]
mod matmul_outer;
mod matmul_stream;
pub mod retention;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;
pub mod widen;
pub mod window_attention;

pub use simd::{axpy, dot, scale_in_place};

/// Elements per parallel task of the element-wise kernels (SwiGLU, RMSNorm, RoPE, residual
/// adds): a prompt chunk's activations are split across threads in tasks of this size; a
/// decode step's few rows run on the calling thread. Run on one thread, these took a tenth
/// of a bf16 prefill's wall time while the other core waited.
pub(crate) const PAR_TASK: usize = 1 << 14;

/// Whether `elems` elements are worth splitting into [`PAR_TASK`]-sized tasks.
pub(crate) fn parallel(elems: usize) -> bool {
    elems >= 4 * PAR_TASK
}

/// Rows of `width` elements per parallel task (at least one).
pub(crate) fn rows_per_task(width: usize) -> usize {
    (PAR_TASK / width.max(1)).max(1)
}

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
