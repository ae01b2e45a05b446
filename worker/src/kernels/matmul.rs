//! `out = x · wᵀ` for row-major activations `x [m, k]` and checkpoint-layout weights `w [n, k]`
//! stored as f32, bf16 or f16 (widened to f32 as they are read; the arithmetic is f32).
//! Large m goes to the `gemm` crate (compute-bound prefill); small m, i.e. decode and batched
//! decode, to `matmul_stream`, which reads each weight row from memory once for all input rows.

use rayon::prelude::*;

use super::widen::Widen;

/// Up to this many rows, the weight-streaming kernel beats the GEMM library (measured on
/// 256…768-wide layers and the 100K-row output projection).
pub const STREAM_MAX_ROWS: usize = 64;

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`.
pub fn matmul_t<W: Widen>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * k, "matmul_t: x is not [m, k]");
    assert_eq!(w.len(), n * k, "matmul_t: w is not [n, k]");
    assert_eq!(out.len(), m * n, "matmul_t: out is not [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
    } else if m <= STREAM_MAX_ROWS {
        super::matmul_stream::matmul_t_stream(x, m, k, w, n, out);
    } else if let Some(w) = W::as_f32(w) {
        matmul_t_gemm(x, m, k, w, n, n, out);
    } else {
        // Widen a band of weight rows at a time (about 4 MiB) and multiply it: the widening is
        // O(n·k) beside the product's O(m·n·k).
        let band = ((1 << 20) / k).max(64);
        let mut wide = vec![0f32; band.min(n) * k];
        for j0 in (0..n).step_by(band) {
            let rows = band.min(n - j0);
            let wide = &mut wide[..rows * k];
            wide.par_chunks_mut(k * 16).zip(w[j0 * k..(j0 + rows) * k].par_chunks(k * 16)).for_each(|(d, s)| {
                W::widen_into(s, d);
            });
            matmul_t_gemm(x, m, k, wide, rows, n, &mut out[j0..]);
        }
    }
}

/// Allocating form of [`matmul_t`].
pub fn linear<W: Widen>(x: &[f32], m: usize, k: usize, w: &[W], n: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    matmul_t(x, m, k, w, n, &mut out);
    out
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` through the `gemm` crate alone (what [`matmul_t`] uses
/// beyond 64 input rows), for benchmarks that compare the two.
pub fn matmul_t_library(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    assert!(x.len() == m * k && w.len() == n * k && out.len() == m * n, "matmul_t_library: operand shapes");
    if m > 0 && n > 0 {
        matmul_t_gemm(x, m, k, w, n, n, out);
    }
}

/// `out[i, j] = Σ x[i, :]·w[j, :]` for `j < n`, with `out`'s rows `out_stride` apart.
fn matmul_t_gemm(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out_stride: usize, out: &mut [f32]) {
    assert!(w.len() >= n * k && out.len() >= (m - 1) * out_stride + n, "matmul_t_gemm: short operands");
    let threads = rayon::current_num_threads();
    let parallelism =
        if threads > 1 && m * n * k >= 1 << 18 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the assert above guarantees every pointer covers the strided extents below: dst is
    // m×n (row stride out_stride), lhs is m×k (row stride k), rhs is wᵀ, k×n, read with column
    // stride k and row stride 1 from the n×k row-major w.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            out_stride as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Plain triple loop in f64: the reference the fast paths are tested against.
pub fn matmul_t_reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f64;
            for p in 0..k {
                acc += x[i * k + p] as f64 * w[j * k + p] as f64;
            }
            out[i * n + j] = acc as f32;
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::testutil::{assert_close, randn};

    /// Shapes through every path: one input row (weight rows in eights, fours and singles), up
    /// to 64 rows (pairs and an odd row), the GEMM beyond, k over several 512-column blocks and
    /// with a tail that is not a multiple of 8.
    pub(crate) const SHAPES: [(usize, usize, usize); 19] = [
        (1, 1, 1),
        (1, 37, 130),
        (3, 64, 65),
        (8, 100, 7),
        (9, 33, 17),
        (33, 1100, 45),
        (64, 96, 80),
        (65, 96, 80),
        (200, 256, 300),
        (2, 520, 13),
        // k a multiple of 16 (AVX-512's four-by-four and one-by-sixteen tiles).
        (1, 256, 300),
        (6, 32, 21),
        (7, 528, 19),
        (32, 256, 40),
        // k a multiple of 8: the AVX2 kernel's weight bands (several, the last one short) and
        // k blocks.
        (13, 1032, 2000),
        (5, 1032, 50),
        // Rows that fill AVX-512's outer-product row blocks (`matmul_outer`), k with a tail.
        (24, 1000, 77),
        (48, 40, 300),
        (60, 256, 1000),
    ];

    #[test]
    fn matches_reference_on_every_path() {
        for &(m, k, n) in &SHAPES {
            let x = randn(m * k, m as u64);
            let w = randn(n * k, n as u64 + 100);
            let got = linear(&x, m, k, &w, n);
            let want = matmul_t_reference(&x, m, k, &w, n);
            // f32 sums of k terms of O(1) values.
            assert_close(&got, &want, 1e-5, &format!("m={m} k={k} n={n}"));
        }
    }

    #[test]
    fn half_precision_weights_match_the_reference_on_their_widened_values() {
        use half::{bf16, f16};
        for &(m, k, n) in &SHAPES {
            let x = randn(m * k, m as u64 + 7);
            let w = randn(n * k, n as u64 + 9);
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let tol = 1e-5;
            let widened: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let want = matmul_t_reference(&x, m, k, &widened, n);
            assert_close(&linear(&x, m, k, &wb, n), &want, tol, &format!("bf16 m={m} k={k} n={n}"));
            let widened: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
            let want = matmul_t_reference(&x, m, k, &widened, n);
            assert_close(&linear(&x, m, k, &wh, n), &want, tol, &format!("f16 m={m} k={k} n={n}"));
        }
    }
}
