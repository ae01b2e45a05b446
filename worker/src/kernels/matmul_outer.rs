//! The weight-streaming product `x [m, k] · wᵀ` for 17 to 64 input rows on AVX-512, as a sum
//! of outer products: the input rows go in registers sixteen at a time along the lanes (their
//! transpose, packed once per product), each weight element is broadcast and multiplied into
//! every row at once, and every accumulator holds finished results, so no horizontal sums.
//!
//! The dot-product tiles of `matmul` reduce sixteen partial sums per result after each block
//! of k; with k = 256 (the tiny preset's width) that reduction and the scattered stores were a
//! quarter of the 32-row output projection's time. Here the same product needs one register
//! per 16 results per weight row, and the only overhead is the final store.

use std::arch::x86_64::*;

use super::widen::Widen;

/// Lanes of an AVX-512 register: input rows per row block.
const LANES: usize = 16;
/// Accumulator registers of the tile (row blocks × weight rows), leaving room for the row
/// blocks' inputs and one broadcast in the 32 registers.
const ACCUMULATORS: usize = 24;

/// Whether this kernel runs `m` input rows on this CPU.
pub(super) fn available(m: usize) -> bool {
    (17..=4 * LANES).contains(&m) && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("f16c")
}

/// Whether it beats the dot-product tiles for `m` rows: where at least three quarters of the
/// row blocks' lanes carry rows (measured on the 32 × 256 × 100K output projection: 4.4–5.2
/// against 6.8–6.9 ms at 32 rows, 7.0 against 8.8 at 48, 8.7 against 10.9 at 64; 4.0 against
/// 3.5 at 20 rows, where 12 of 32 lanes are padding).
pub(super) fn pays(m: usize) -> bool {
    available(m) && 4 * m >= 3 * LANES * m.div_ceil(LANES)
}

/// `x [m, k]` transposed into row blocks of sixteen: `xt[(b · k + p) · 16 + l] = x[b · 16 + l, p]`,
/// zero past the last row; sixteen columns at a time by an in-register transpose.
///
/// # Panics
/// Where [`available`] is false for `m`.
pub(super) fn pack_transposed(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    assert!(available(m) && x.len() == m * k, "pack_transposed: x is not [m, k] of 17 to 64 rows");
    let blocks = m.div_ceil(LANES);
    let mut xt = vec![0f32; blocks * k * LANES];
    // SAFETY: available(m) checked the CPU's features.
    unsafe { pack_avx512(x, m, k, &mut xt) };
    xt
}

#[target_feature(enable = "avx512f")]
unsafe fn pack_avx512(x: &[f32], m: usize, k: usize, xt: &mut [f32]) {
    let full = k / LANES * LANES;
    for b in 0..m.div_ceil(LANES) {
        let rows = (m - b * LANES).min(LANES);
        for p0 in (0..full).step_by(LANES) {
            let mut r = [_mm512_setzero_ps(); LANES];
            for (l, v) in r.iter_mut().enumerate().take(rows) {
                // SAFETY: row b·16 + l < m and p0 + 16 <= k.
                *v = _mm512_loadu_ps(x.as_ptr().add((b * LANES + l) * k + p0));
            }
            transpose16(&mut r);
            for (q, v) in r.iter().enumerate() {
                let at = (b * k + p0 + q) * LANES;
                _mm512_storeu_ps(xt[at..at + LANES].as_mut_ptr(), *v);
            }
        }
        for l in 0..rows {
            for p in full..k {
                xt[(b * k + p) * LANES + l] = x[(b * LANES + l) * k + p];
            }
        }
    }
}

/// The two-source permutation of one transpose stage (see [`transpose16`]): for the row with
/// bit `h` clear (`upper` false) or set.
const fn stage_index(h: usize, upper: bool) -> [i32; 16] {
    let mut idx = [0i32; 16];
    let mut c = 0;
    while c < 16 {
        let low = c & h == 0;
        idx[c] = match (upper, low) {
            (false, true) => c as i32,
            (false, false) => (16 + c - h) as i32,
            (true, true) => (c + h) as i32,
            (true, false) => (16 + c) as i32,
        };
        c += 1;
    }
    idx
}

/// Transposes the 16 × 16 matrix whose rows are `r`: four stages, stage `h` swapping bit `h` of
/// the row index with bit `h` of the column index between rows `i` and `i + h`.
#[inline(always)]
unsafe fn transpose16(r: &mut [__m512; 16]) {
    const STAGES: [(usize, [i32; 16], [i32; 16]); 4] = [
        (8, stage_index(8, false), stage_index(8, true)),
        (4, stage_index(4, false), stage_index(4, true)),
        (2, stage_index(2, false), stage_index(2, true)),
        (1, stage_index(1, false), stage_index(1, true)),
    ];
    for (h, lower, upper) in STAGES {
        let (lo, hi) = (_mm512_loadu_si512(lower.as_ptr().cast()), _mm512_loadu_si512(upper.as_ptr().cast()));
        for i in (0..16).filter(|i| i & h == 0) {
            let (a, b) = (r[i], r[i + h]);
            r[i] = _mm512_permutex2var_ps(a, lo, b);
            r[i + h] = _mm512_permutex2var_ps(a, hi, b);
        }
    }
}

/// `out[i, j0 + c] = x[i, :]·w_rows[c, :]` for the `m` input rows packed in `xt` (see
/// [`pack_transposed`]) and the weight rows of one task; `out` is the row-major `[m, n]`
/// result, of which this task writes only its own columns.
///
/// # Safety
/// [`available`] holds for `m`; `out` points at an `m × n` matrix whose columns
/// `j0..j0 + w_rows.len() / k` no other thread touches meanwhile.
pub(super) unsafe fn stream_rows<W: Widen>(
    xt: &[f32],
    m: usize,
    k: usize,
    w_rows: &[W],
    j0: usize,
    n: usize,
    out: *mut f32,
) {
    match m.div_ceil(LANES) {
        2 => rows_with::<W, 2, 12, 6, 3>(xt, m, k, w_rows, j0, n, out),
        3 => rows_with::<W, 3, 8, 4, 2>(xt, m, k, w_rows, j0, n, out),
        _ => rows_with::<W, 4, 6, 3, 2>(xt, m, k, w_rows, j0, n, out),
    }
}

/// [`stream_rows`] with `B` row blocks: weight rows `C` at a time (`B · C` accumulators), the
/// rest `C2`, `C3` and then one at a time.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn rows_with<W: Widen, const B: usize, const C: usize, const C2: usize, const C3: usize>(
    xt: &[f32],
    m: usize,
    k: usize,
    w_rows: &[W],
    j0: usize,
    n: usize,
    out: *mut f32,
) {
    const { assert!(B * C <= ACCUMULATORS && C2 < C && C3 < C2) };
    assert!(m.div_ceil(LANES) == B && xt.len() == B * k * LANES && w_rows.len().is_multiple_of(k));
    let rows = w_rows.len() / k;
    assert!(j0 + rows <= n, "weight rows beyond the result's columns");
    // Half-precision weights are widened a tile at a time into this buffer (in L1).
    let mut wide = if W::as_f32(w_rows).is_some() { Vec::new() } else { vec![0f32; C * k] };
    let mut c = 0;
    while c < rows {
        let tile = [C, C2, C3, 1].into_iter().find(|&t| c + t <= rows).expect("1 <= rows - c");
        let src = &w_rows[c * k..(c + tile) * k];
        let w: &[f32] = match W::as_f32(src) {
            Some(w) => w,
            None => {
                W::widen_into(src, &mut wide[..tile * k]);
                &wide[..tile * k]
            }
        };
        // The next tile's rows, prefetched while this one is multiplied.
        let next = w_rows.as_ptr().wrapping_add((c + tile) * k);
        match tile {
            t if t == C => tile_product::<W, B, C>(xt, m, k, w, next, j0 + c, n, out),
            t if t == C2 => tile_product::<W, B, C2>(xt, m, k, w, next, j0 + c, n, out),
            t if t == C3 => tile_product::<W, B, C3>(xt, m, k, w, next, j0 + c, n, out),
            _ => tile_product::<W, B, 1>(xt, m, k, w, next, j0 + c, n, out),
        }
        c += tile;
    }
}

/// `B` row blocks of `xt` against `C` weight rows `w` (f32, `C × k`), stored into columns
/// `j..j + C` of `out`. `next` is where the following tile starts in the weights' own type
/// (only prefetched: any address will do).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_product<W: Widen, const B: usize, const C: usize>(
    xt: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    next: *const W,
    j: usize,
    n: usize,
    out: *mut f32,
) {
    assert!(w.len() == C * k && xt.len() == B * k * LANES);
    let (xp, wp) = (xt.as_ptr(), w.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); C]; B];
    let line = 64 / W::BYTES;
    for p in 0..k {
        if p % line == 0 {
            for c in 0..C {
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(c * k + p).cast());
            }
        }
        // SAFETY (loads): p < k, so every index lies inside xt (B × k × 16) and w (C × k).
        let mut xv = [_mm512_setzero_ps(); B];
        for b in 0..B {
            xv[b] = _mm512_loadu_ps(xp.add((b * k + p) * LANES));
        }
        for c in 0..C {
            let wv = _mm512_set1_ps(*wp.add(c * k + p));
            for b in 0..B {
                acc[b][c] = _mm512_fmadd_ps(xv[b], wv, acc[b][c]);
            }
        }
    }
    let mut lanes = [0f32; LANES];
    for b in 0..B {
        let valid = (m - b * LANES).min(LANES);
        for c in 0..C {
            _mm512_storeu_ps(lanes.as_mut_ptr(), acc[b][c]);
            for (l, &v) in lanes[..valid].iter().enumerate() {
                // SAFETY: row b·16 + l < m and column j + c < n: inside the result, in this
                // task's columns.
                *out.add((b * LANES + l) * n + j + c) = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::matmul_t_reference;
    use crate::kernels::testutil::{assert_close, randn};

    /// Every row-block count with full and partial blocks, k with and without a tail past the
    /// last sixteen columns, and weight-row counts that end in every tile size.
    #[test]
    fn matches_the_reference_for_every_tile() {
        use half::bf16;
        if !available(32) {
            return;
        }
        for m in [17, 24, 32, 33, 47, 48, 50, 64] {
            for k in [1, 16, 37, 256] {
                for rows in [1, 2, 3, 5, 7, 11, 12, 13, 20, 21, 23, 25, 31] {
                    let x = randn(m * k, (m * 1000 + k) as u64);
                    let w = randn(rows * k, (rows * 7 + k) as u64);
                    let xt = pack_transposed(&x, m, k);
                    // The task's rows land in columns 3.. of a wider result.
                    let (j0, n) = (3, rows + 5);
                    let mut out = vec![f32::NAN; m * n];
                    // SAFETY: available(m); this thread alone writes `out`.
                    unsafe { stream_rows(&xt, m, k, &w, j0, n, out.as_mut_ptr()) };
                    let want = matmul_t_reference(&x, m, k, &w, rows);
                    let got: Vec<f32> = (0..m).flat_map(|i| out[i * n + j0..i * n + j0 + rows].to_vec()).collect();
                    // f32 sums of k terms of O(1) values, in another order than the reference.
                    assert_close(&got, &want, 1e-5, &format!("m={m} k={k} rows={rows}"));
                    assert!((0..m).all(|i| out[i * n..i * n + j0].iter().all(|v| v.is_nan())), "wrote left of j0");
                    assert!((0..m).all(|i| out[i * n + j0 + rows..(i + 1) * n].iter().all(|v| v.is_nan())));

                    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
                    let widened: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
                    // SAFETY: as above.
                    unsafe { stream_rows(&xt, m, k, &wb, j0, n, out.as_mut_ptr()) };
                    let want = matmul_t_reference(&x, m, k, &widened, rows);
                    let got: Vec<f32> = (0..m).flat_map(|i| out[i * n + j0..i * n + j0 + rows].to_vec()).collect();
                    assert_close(&got, &want, 1e-5, &format!("bf16 m={m} k={k} rows={rows}"));
                }
            }
        }
    }

    #[test]
    fn packing_transposes_into_zero_padded_row_blocks() {
        if !available(40) {
            return;
        }
        let (m, k) = (40, 35);
        let x: Vec<f32> = (0..m * k).map(|i| i as f32).collect();
        let xt = pack_transposed(&x, m, k);
        assert_eq!(xt.len(), 3 * k * LANES);
        for b in 0..3 {
            for p in 0..k {
                for l in 0..LANES {
                    let i = b * LANES + l;
                    let want = if i < m { x[i * k + p] } else { 0.0 };
                    assert_eq!(xt[(b * k + p) * LANES + l], want, "block {b} column {p} lane {l}");
                }
            }
        }
    }

    #[test]
    fn pays_where_three_quarters_of_the_lanes_hold_rows() {
        if !available(32) {
            return;
        }
        let paying: Vec<usize> = (1..=80).filter(|&m| pays(m)).collect();
        let want: Vec<usize> = (24..=32).chain(36..=48).chain(49..=64).collect();
        assert_eq!(paying, want);
    }
}
