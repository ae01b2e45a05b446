//! RMSNorm: `x · rsqrt(mean(x²) + eps) · weight`, in f32, row by row.

use rayon::prelude::*;

use super::simd::dot;

/// Normalises each `dim`-wide row of `x` into `out`; `weight` absent means no affine scale
/// (the `subln` of gated retention). Many rows are split across threads.
pub fn rms_norm(x: &[f32], dim: usize, weight: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    assert_eq!(x.len() % dim, 0);
    if super::parallel(x.len()) {
        let task = super::rows_per_task(dim) * dim;
        out.par_chunks_mut(task).zip(x.par_chunks(task)).for_each(|(o, x)| rms_norm_rows(x, dim, weight, eps, o));
    } else {
        rms_norm_rows(x, dim, weight, eps, out);
    }
}

fn rms_norm_rows(x: &[f32], dim: usize, weight: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    for (row, out_row) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let inv = 1.0 / (dot(row, row) / dim as f32 + eps).sqrt();
        match weight {
            Some(w) => {
                for ((o, &v), &g) in out_row.iter_mut().zip(row).zip(w) {
                    *o = (v * inv) * g;
                }
            }
            None => {
                for (o, &v) in out_row.iter_mut().zip(row) {
                    *o = v * inv;
                }
            }
        }
    }
}

/// Allocating form of [`rms_norm`].
pub fn rms_norm_new(x: &[f32], dim: usize, weight: Option<&[f32]>, eps: f32) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    rms_norm(x, dim, weight, eps, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{assert_close, randn};

    #[test]
    fn matches_reference() {
        let dim = 37;
        let x = randn(dim * 5, 3);
        let w = randn(dim, 4);
        let got = rms_norm_new(&x, dim, Some(&w), 1e-5);
        let mut want = vec![0.0; x.len()];
        for r in 0..5 {
            let row = &x[r * dim..(r + 1) * dim];
            let ms: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / dim as f64;
            for i in 0..dim {
                want[r * dim + i] = (row[i] as f64 / (ms + 1e-5).sqrt() * w[i] as f64) as f32;
            }
        }
        assert_close(&got, &want, 1e-5, "rms_norm");
        let plain = rms_norm_new(&x, dim, None, 1e-5);
        let ones = vec![1.0; dim];
        assert_close(&plain, &rms_norm_new(&x, dim, Some(&ones), 1e-5), 0.0, "rms_norm without weight");
    }

    /// Many rows (split across threads) normalise as each row alone does, bit for bit.
    #[test]
    fn parallel_rows_equal_single_rows() {
        let (rows, dim) = (1000, 96);
        let x = randn(rows * dim, 9);
        let w = randn(dim, 10);
        let all = rms_norm_new(&x, dim, Some(&w), 1e-5);
        for r in (0..rows).step_by(97) {
            let one = rms_norm_new(&x[r * dim..(r + 1) * dim], dim, Some(&w), 1e-5);
            assert_eq!(&all[r * dim..(r + 1) * dim], &one[..], "row {r}");
        }
    }
}
