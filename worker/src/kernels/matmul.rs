//! `out = x · wᵀ` for row-major activations `x [m, k]` and checkpoint-layout weights `w [n, k]`.
//! Large m goes to the `gemm` crate (compute-bound prefill); small m, i.e. decode, to a kernel
//! that streams each weight row once and applies it to every input row (memory-bound).

use rayon::prelude::*;

use super::simd::dot_inline;

/// Up to this many rows, the weight-streaming kernel beats a GEMM library.
const STREAM_MAX_ROWS: usize = 8;
/// Weight rows per parallel task in the streaming kernel.
const STREAM_ROWS_PER_TASK: usize = 64;

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`.
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * k, "matmul_t: x is not [m, k]");
    assert_eq!(w.len(), n * k, "matmul_t: w is not [n, k]");
    assert_eq!(out.len(), m * n, "matmul_t: out is not [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
    } else if m <= STREAM_MAX_ROWS {
        matmul_t_stream(x, m, k, w, n, out);
    } else {
        matmul_t_gemm(x, m, k, w, n, out);
    }
}

/// Allocating form of [`matmul_t`].
pub fn linear(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    matmul_t(x, m, k, w, n, &mut out);
    out
}

fn matmul_t_gemm(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    let threads = rayon::current_num_threads();
    let parallelism =
        if threads > 1 && m * n * k >= 1 << 18 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the asserts in `matmul_t` guarantee every pointer covers the strided extents below:
    // dst is m×n (row stride n), lhs is m×k (row stride k), rhs is wᵀ, k×n, read with column
    // stride k and row stride 1 from the n×k row-major w.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
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

multiversion! {
    fn stream_rows(x: &[f32], m: usize, k: usize, w_rows: &[f32], out_t: &mut [f32]) {
        for (w_row, out_row) in w_rows.chunks_exact(k).zip(out_t.chunks_exact_mut(m)) {
            for (i, o) in out_row.iter_mut().enumerate() {
                *o = dot_inline(w_row, &x[i * k..(i + 1) * k]);
            }
        }
    }
}

fn matmul_t_stream(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    if m == 1 {
        out.par_chunks_mut(STREAM_ROWS_PER_TASK)
            .zip(w.par_chunks(STREAM_ROWS_PER_TASK * k))
            .for_each(|(o, wr)| stream_rows(x, 1, k, wr, o));
        return;
    }
    // Columns of the result are computed together per weight row, then transposed.
    let mut out_t = vec![0.0f32; n * m];
    out_t
        .par_chunks_mut(STREAM_ROWS_PER_TASK * m)
        .zip(w.par_chunks(STREAM_ROWS_PER_TASK * k))
        .for_each(|(o, wr)| stream_rows(x, m, k, wr, o));
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = out_t[j * m + i];
        }
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
mod tests {
    use super::*;
    use crate::kernels::testutil::{assert_close, randn};

    #[test]
    fn matches_reference_on_every_path() {
        for &(m, k, n) in
            &[(1, 1, 1), (1, 37, 130), (3, 64, 65), (8, 100, 7), (9, 33, 17), (64, 96, 80), (200, 256, 300)]
        {
            let x = randn(m * k, m as u64);
            let w = randn(n * k, n as u64 + 100);
            let got = linear(&x, m, k, &w, n);
            let want = matmul_t_reference(&x, m, k, &w, n);
            // f32 sums of up to 256 terms of O(1) values.
            for (g, r) in got.iter().zip(&want) {
                assert!((g - r).abs() <= 1e-4 * (k as f32).sqrt(), "m={m} k={k} n={n}: {g} vs {r}");
            }
            let _ = assert_close;
        }
    }
}
