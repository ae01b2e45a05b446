//! RMSNorm: `x · rsqrt(mean(x²) + eps) · weight`, in f32, row by row.

use super::simd::dot;

/// Normalises each `dim`-wide row of `x` into `out`; `weight` absent means no affine scale
/// (the `subln` of gated retention).
pub fn rms_norm(x: &[f32], dim: usize, weight: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    assert_eq!(x.len() % dim, 0);
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
}
