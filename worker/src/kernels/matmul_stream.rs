//! `out = x · wᵀ` for few input rows (decode and batched decode): each weight row is streamed
//! from memory once and applied to every input row from cache, in register tiles of input rows ×
//! weight rows: dot products for up to 16 rows (portable, AVX2, AVX-512), outer products
//! (`matmul_outer`) for the batched rows that fill AVX-512 registers. [`super::matmul::matmul_t`]
//! sends up to [`super::matmul::STREAM_MAX_ROWS`] rows here.

use rayon::prelude::*;

use super::widen::Widen;

/// Weight rows per parallel task in the streaming kernel, at least.
const STREAM_MIN_ROWS_PER_TASK: usize = 32;
/// Columns of `k` per pass of the streaming kernel, so that the input rows' slices
/// (m × this × 4 bytes) stay in L2 while the weight tile stays in L1.
const STREAM_K_BLOCK: usize = 512;
/// Weight bytes per band of the AVX2 streaming kernel: a band stays in L2 while every input
/// row passes over it.
const STREAM_BAND_BYTES: usize = 64 << 10;
/// The register tile of the AVX2 kernel for k a multiple of 8 (`stream_rows_avx2_sum8`).
const SUM8_ROWS: usize = 4;
const SUM8_COLS: usize = 3;
/// Accumulator lanes.
const L: usize = 8;
/// The streaming kernel's register tile: input rows × weight rows (TILE_ROWS · TILE_COLS
/// accumulators, TILE_COLS weight registers and one input register: 16 AVX registers).
const TILE_ROWS: usize = 4;
const TILE_COLS: usize = 3;

/// `R` input rows against `C` weight rows (all of one length): the `R × C` dot products, each
/// accumulated in `L` lanes, so one pass reads each weight element once for `R` rows.
#[inline(always)]
fn tile<W: Widen, const R: usize, const C: usize>(x: [&[f32]; R], w: [&[W]; C], _ahead: usize) -> [[f32; C]; R] {
    let k = w[0].len();
    assert!(x.iter().all(|r| r.len() == k) && w.iter().all(|r| r.len() == k));
    let mut acc = [[[0f32; L]; C]; R];
    let full = k / L * L;
    let mut p = 0;
    while p < full {
        let wv: [[f32; L]; C] = std::array::from_fn(|c| W::widen8(w[c][p..p + L].try_into().unwrap()));
        for r in 0..R {
            let xv: &[f32; L] = x[r][p..p + L].try_into().unwrap();
            for c in 0..C {
                for l in 0..L {
                    acc[r][c][l] += xv[l] * wv[c][l];
                }
            }
        }
        p += L;
    }
    let mut out = [[0f32; C]; R];
    for r in 0..R {
        for c in 0..C {
            let a = &acc[r][c];
            let mut s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
            for q in full..k {
                s += x[r][q] * w[c][q].widen();
            }
            out[r][c] = s;
        }
    }
    out
}

/// [`tile`] with AVX2 registers and FMA.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_avx2<W: Widen, const R: usize, const C: usize>(
    x: [&[f32]; R],
    w: [&[W]; C],
    ahead: usize,
) -> [[f32; C]; R] {
    use std::arch::x86_64::*;
    let k = w[0].len();
    assert!(x.iter().all(|r| r.len() == k) && w.iter().all(|r| r.len() == k));
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let full = k / L * L;
    let mut p = 0;
    while p < full {
        // SAFETY: p + L <= k, the length of every row.
        let mut wv = [_mm256_setzero_ps(); C];
        for c in 0..C {
            wv[c] = W::load8_avx2(w[c].as_ptr().add(p));
        }
        if ahead > 0 && p % (64 / W::BYTES) == 0 {
            // The same columns of the next tile's weight rows (they follow these in memory):
            // a prefetch hint only, valid for any address.
            for row in &w {
                _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().add(p).wrapping_add(ahead).cast());
            }
        }
        for r in 0..R {
            let xv = _mm256_loadu_ps(x[r].as_ptr().add(p));
            for c in 0..C {
                acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
            }
        }
        p += L;
    }
    let mut out = [[0f32; C]; R];
    for r in 0..R {
        for c in 0..C {
            let mut s = super::simd::hsum(acc[r][c]);
            for q in full..k {
                s += x[r][q] * w[c][q].widen();
            }
            out[r][c] = s;
        }
    }
    out
}

/// [`tile`] with AVX-512 registers: sixteen lanes.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_avx512<W: Widen, const R: usize, const C: usize>(
    x: [&[f32]; R],
    w: [&[W]; C],
    ahead: usize,
) -> [[f32; C]; R] {
    use std::arch::x86_64::*;
    const L16: usize = 16;
    let k = w[0].len();
    assert!(x.iter().all(|r| r.len() == k) && w.iter().all(|r| r.len() == k));
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let full = k / L16 * L16;
    let mut p = 0;
    while p < full {
        // SAFETY: p + 16 <= k, the length of every row. (A loop, not `array::from_fn`: see
        // `simd::hsum16x16`.)
        let mut wv = [_mm512_setzero_ps(); C];
        for c in 0..C {
            wv[c] = W::load16_avx512(w[c].as_ptr().add(p));
        }
        if ahead > 0 && p % (64 / W::BYTES) == 0 {
            // As in tile_avx2: a hint for the next tile's rows, valid for any address.
            for row in &w {
                _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().add(p).wrapping_add(ahead).cast());
            }
        }
        for r in 0..R {
            let xv = _mm512_loadu_ps(x[r].as_ptr().add(p));
            for c in 0..C {
                acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
            }
        }
        p += L16;
    }
    let mut out = [[0f32; C]; R];
    for r in 0..R {
        for c in 0..C {
            let mut s = _mm512_reduce_add_ps(acc[r][c]);
            for q in full..k {
                s += x[r][q] * w[c][q].widen();
            }
            out[r][c] = s;
        }
    }
    out
}

/// A raw pointer to the result matrix, shared by tasks that write disjoint columns of it.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: every task writes only the columns of its own weight rows (see `matmul_t_stream`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer itself (a method, so that closures capture the whole `OutPtr`).
    pub(super) fn raw(self) -> *mut f32 {
        self.0
    }

    /// Results `lanes` of row i, columns `j..` of the m×n result: stored by the first block of
    /// k (`first`), added by the others.
    ///
    /// # Safety
    /// Only the calling task writes those columns.
    #[inline(always)]
    unsafe fn put(self, m: usize, n: usize, i: usize, j: usize, lanes: &[f32], first: bool) {
        assert!(i < m && j + lanes.len() <= n, "a result outside the m×n matrix");
        for (d, &v) in lanes.iter().enumerate() {
            // SAFETY: the element lies inside the m×n result (asserted); the caller owns it.
            let o = self.0.add(i * n + j + d);
            *o = if first { v } else { *o + v };
        }
    }
}

/// `out[i, j0 + c] = x[i, :]·w_rows[c, :]` for all m input rows and the weight rows of one
/// task, `k` in blocks, input rows in pairs and weight rows in fours. `$tile` is [`tile`] or
/// [`tile_avx2`].
macro_rules! stream_rows_with {
    ($tile:ident, $x:expr, $m:expr, $k:expr, $w_rows:expr, $j0:expr, $n:expr, $out:expr) => {{
        let (x, m, k, w_rows, j0, n, out): (&[f32], usize, usize, &[_], usize, usize, OutPtr) =
            ($x, $m, $k, $w_rows, $j0, $n, $out);
        let rows = w_rows.len() / k;
        for k0 in (0..k).step_by(STREAM_K_BLOCK) {
            // The first block of k stores, the others add.
            // SAFETY: only this task writes columns j0..j0 + rows.
            let add = |i: usize, j: usize, v: f32| unsafe { out.put(m, n, i, j, &[v], k0 == 0) };
            let kr = k0..(k0 + STREAM_K_BLOCK).min(k);
            let xr = |i: usize| &x[i * k + kr.start..i * k + kr.end];
            let wr = |c: usize| &w_rows[c * k + kr.start..c * k + kr.end];
            let mut c = 0;
            if m == 1 {
                while c + 8 <= rows {
                    let w8 = [wr(c), wr(c + 1), wr(c + 2), wr(c + 3), wr(c + 4), wr(c + 5), wr(c + 6), wr(c + 7)];
                    for (dc, v) in $tile([xr(0)], w8, 8 * k)[0].iter().enumerate() {
                        add(0, j0 + c + dc, *v);
                    }
                    c += 8;
                }
            }
            while c + TILE_COLS <= rows {
                let wc: [&[_]; TILE_COLS] = std::array::from_fn(|d| wr(c + d));
                let mut i = 0;
                while i + TILE_ROWS <= m {
                    // The first input rows also prefetch the next weight rows.
                    let ahead = if i == 0 { TILE_COLS * k } else { 0 };
                    let t = $tile(std::array::from_fn::<_, TILE_ROWS, _>(|r| xr(i + r)), wc, ahead);
                    for (r, row) in t.iter().enumerate() {
                        for (dc, v) in row.iter().enumerate() {
                            add(i + r, j0 + c + dc, *v);
                        }
                    }
                    i += TILE_ROWS;
                }
                for i in i..m {
                    for (dc, v) in $tile([xr(i)], wc, if i == 0 { TILE_COLS * k } else { 0 })[0].iter().enumerate() {
                        add(i, j0 + c + dc, *v);
                    }
                }
                c += TILE_COLS;
            }
            for c in c..rows {
                for i in 0..m {
                    add(i, j0 + c, $tile([xr(i)], [wr(c)], 0)[0][0]);
                }
            }
        }
    }};
}

/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn stream_rows_avx2<W: Widen>(x: &[f32], m: usize, k: usize, w_rows: &[W], j0: usize, n: usize, out: OutPtr) {
    if k.is_multiple_of(L) {
        return stream_rows_avx2_sum8(x, m, k, w_rows, j0, n, out);
    }
    stream_rows_with!(tile_avx2, x, m, k, w_rows, j0, n, out)
}

/// `R` input rows against `C` weight rows (`R · C <= 12`), every row a multiple of 8 long: the
/// `R · C` dot products into `sums[r · C + c]`. The accumulators are reduced eight and four at a
/// time by transposing sums (`simd::hsum8x8`, `hsum4x4`): about two operations per result
/// where one horizontal sum each costs seven; with k = 256 those were a sixth of the tile.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `ahead` as in [`tile_avx2`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_sum_avx2<W: Widen, const R: usize, const C: usize>(
    x: [&[f32]; R],
    w: [&[W]; C],
    ahead: usize,
    sums: &mut [f32; 12],
) {
    use super::simd::{hsum, hsum4x4, hsum8x8};
    use std::arch::x86_64::*;
    const { assert!(R * C <= 12) };
    let k = w[0].len();
    assert!(k.is_multiple_of(L) && x.iter().all(|r| r.len() == k) && w.iter().all(|r| r.len() == k));
    let mut acc = [_mm256_setzero_ps(); 12];
    for p in (0..k).step_by(L) {
        // SAFETY: p + 8 <= k, the length of every row. (Loops, not `array::from_fn`: see
        // `simd::hsum16x16`.)
        let mut wv = [_mm256_setzero_ps(); C];
        for c in 0..C {
            wv[c] = W::load8_avx2(w[c].as_ptr().add(p));
        }
        if ahead > 0 && p % (64 / W::BYTES) == 0 {
            for row in &w {
                _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().add(p).wrapping_add(ahead).cast());
            }
        }
        for r in 0..R {
            let xv = _mm256_loadu_ps(x[r].as_ptr().add(p));
            for c in 0..C {
                acc[r * C + c] = _mm256_fmadd_ps(xv, wv[c], acc[r * C + c]);
            }
        }
    }
    let mut e = 0;
    while e + 8 <= R * C {
        _mm256_storeu_ps(
            sums.as_mut_ptr().add(e),
            hsum8x8([acc[e], acc[e + 1], acc[e + 2], acc[e + 3], acc[e + 4], acc[e + 5], acc[e + 6], acc[e + 7]]),
        );
        e += 8;
    }
    while e + 4 <= R * C {
        _mm_storeu_ps(sums.as_mut_ptr().add(e), hsum4x4([acc[e], acc[e + 1], acc[e + 2], acc[e + 3]]));
        e += 4;
    }
    while e < R * C {
        sums[e] = hsum(acc[e]);
        e += 1;
    }
}

/// [`stream_rows_avx2`] for k a multiple of 8: input rows in fours against weight rows in
/// threes (twelve accumulators, three weight registers and one input register), or one row
/// against eight; what is left one input row against three weight rows, or one against one.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn stream_rows_avx2_sum8<W: Widen>(
    x: &[f32],
    m: usize,
    k: usize,
    w_rows: &[W],
    j0: usize,
    n: usize,
    out: OutPtr,
) {
    let rows = w_rows.len() / k;
    for k0 in (0..k).step_by(STREAM_K_BLOCK) {
        let first = k0 == 0;
        // SAFETY (of `put`): only this task writes columns j0..j0 + rows.
        let put = |i: usize, c: usize, lanes: &[f32]| out.put(m, n, i, j0 + c, lanes, first);
        let kr = k0..(k0 + STREAM_K_BLOCK).min(k);
        let xr = |i: usize| &x[i * k + kr.start..i * k + kr.end];
        let wr = |c: usize| &w_rows[c * k + kr.start..c * k + kr.end];
        let mut sums = [0f32; 12];
        let mut c = 0;
        if m == 1 {
            while c + 8 <= rows {
                tile_sum_avx2::<W, 1, 8>([xr(0)], std::array::from_fn(|d| wr(c + d)), 8 * k, &mut sums);
                put(0, c, &sums[..8]);
                c += 8;
            }
        }
        // Weight rows a band at a time (in L2), each band against every four input rows (in
        // L1). The next band is fetched meanwhile, a few cache lines per tile, so that reading
        // the weights from memory overlaps the products instead of stalling the first rows.
        let band = (STREAM_BAND_BYTES / (kr.len() * W::BYTES) / SUM8_COLS).max(1) * SUM8_COLS;
        let row_lines = (kr.len() * W::BYTES).div_ceil(64);
        let passes = m.div_ceil(SUM8_ROWS);
        while c + SUM8_COLS <= rows {
            let end = c + (band.min(rows - c) / SUM8_COLS * SUM8_COLS);
            let next = end..(end + band).min(rows);
            let tiles = passes * (end - c) / SUM8_COLS;
            let per_tile = (next.len() * row_lines).div_ceil(tiles);
            let mut line = 0;
            let mut fetch_next = || {
                for _ in 0..per_tile {
                    if line < next.len() * row_lines {
                        let row = wr(next.start + line / row_lines).as_ptr().cast::<u8>();
                        // A hint only: the line lies inside the weight rows.
                        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                            row.add(line % row_lines * 64).cast(),
                        );
                        line += 1;
                    }
                }
            };
            let mut i = 0;
            while i + SUM8_ROWS <= m {
                let xs: [&[f32]; SUM8_ROWS] = std::array::from_fn(|r| xr(i + r));
                for c in (c..end).step_by(SUM8_COLS) {
                    fetch_next();
                    tile_sum_avx2::<W, SUM8_ROWS, SUM8_COLS>(xs, std::array::from_fn(|d| wr(c + d)), 0, &mut sums);
                    for r in 0..SUM8_ROWS {
                        put(i + r, c, &sums[r * SUM8_COLS..(r + 1) * SUM8_COLS]);
                    }
                }
                i += SUM8_ROWS;
            }
            if i < m {
                for c in (c..end).step_by(SUM8_COLS) {
                    fetch_next();
                    for i in i..m {
                        tile_sum_avx2::<W, 1, SUM8_COLS>([xr(i)], std::array::from_fn(|d| wr(c + d)), 0, &mut sums);
                        put(i, c, &sums[..SUM8_COLS]);
                    }
                }
            }
            c = end;
        }
        // The last one or two weight rows against four input rows at a time: one against one
        // would load an input chunk for every product.
        let mut i = 0;
        while c < rows && i + SUM8_ROWS <= m {
            let xs: [&[f32]; SUM8_ROWS] = std::array::from_fn(|r| xr(i + r));
            if rows - c == 2 {
                tile_sum_avx2::<W, SUM8_ROWS, 2>(xs, [wr(c), wr(c + 1)], 0, &mut sums);
                for r in 0..SUM8_ROWS {
                    put(i + r, c, &sums[r * 2..r * 2 + 2]);
                }
            } else {
                tile_sum_avx2::<W, SUM8_ROWS, 1>(xs, [wr(c)], 0, &mut sums);
                put(i, c, &sums[..1]);
                put(i + 1, c, &sums[1..2]);
                put(i + 2, c, &sums[2..3]);
                put(i + 3, c, &sums[3..4]);
            }
            i += SUM8_ROWS;
        }
        for c in c..rows {
            for i in i..m {
                tile_sum_avx2::<W, 1, 1>([xr(i)], [wr(c)], 0, &mut sums);
                put(i, c, &sums[..1]);
            }
        }
    }
}

/// # Safety
/// The CPU must have AVX-512F (and the AVX2, FMA and F16C it implies here).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn stream_rows_avx512<W: Widen>(x: &[f32], m: usize, k: usize, w_rows: &[W], j0: usize, n: usize, out: OutPtr) {
    if k.is_multiple_of(16) {
        return stream_rows_avx512_sum16(x, m, k, w_rows, j0, n, out);
    }
    stream_rows_with!(tile_avx512, x, m, k, w_rows, j0, n, out)
}

/// `R` input rows against `C` weight rows, `R · C = 16`, every row a multiple of 16 long: the
/// sixteen dot products in one register, lane `r · C + c`. The accumulators are reduced together
/// by one transposing sum (`simd::hsum16x16`), about three operations per result where a
/// horizontal sum each costs ten; with k = 256 that was a third of the tile's time.
///
/// # Safety
/// The CPU must have AVX-512F; `ahead` as in [`tile_avx2`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile16_avx512<W: Widen, const R: usize, const C: usize>(
    x: [&[f32]; R],
    w: [&[W]; C],
    ahead: usize,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    const { assert!(R * C == 16) };
    let k = w[0].len();
    assert!(k.is_multiple_of(16) && x.iter().all(|r| r.len() == k) && w.iter().all(|r| r.len() == k));
    let mut acc = [_mm512_setzero_ps(); 16];
    for p in (0..k).step_by(16) {
        // SAFETY: p + 16 <= k, the length of every row. (A loop, not `array::from_fn`: see
        // `simd::hsum16x16`.)
        let mut wv = [_mm512_setzero_ps(); C];
        for c in 0..C {
            wv[c] = W::load16_avx512(w[c].as_ptr().add(p));
        }
        if ahead > 0 && p % (64 / W::BYTES) == 0 {
            for row in &w {
                _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().add(p).wrapping_add(ahead).cast());
            }
        }
        for r in 0..R {
            let xv = _mm512_loadu_ps(x[r].as_ptr().add(p));
            for c in 0..C {
                acc[r * C + c] = _mm512_fmadd_ps(xv, wv[c], acc[r * C + c]);
            }
        }
    }
    super::simd::hsum16x16(acc)
}

/// [`stream_rows_avx512`] for k a multiple of 16: input rows in fours against weight rows in
/// fours, or one row against sixteen; what is left (input rows past the last four, weight rows
/// past the last group) one input row against one weight row group at a time.
///
/// # Safety
/// The CPU must have AVX-512F, AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn stream_rows_avx512_sum16<W: Widen>(
    x: &[f32],
    m: usize,
    k: usize,
    w_rows: &[W],
    j0: usize,
    n: usize,
    out: OutPtr,
) {
    use std::arch::x86_64::*;
    let rows = w_rows.len() / k;
    for k0 in (0..k).step_by(STREAM_K_BLOCK) {
        let first = k0 == 0;
        // SAFETY (of `put`): only this task writes columns j0..j0 + rows.
        let put = |i: usize, c: usize, lanes: &[f32]| out.put(m, n, i, j0 + c, lanes, first);
        let kr = k0..(k0 + STREAM_K_BLOCK).min(k);
        let xr = |i: usize| &x[i * k + kr.start..i * k + kr.end];
        let wr = |c: usize| &w_rows[c * k + kr.start..c * k + kr.end];
        let mut lanes = [0f32; 16];
        let mut c = 0;
        if m == 1 {
            while c + 16 <= rows {
                let v = tile16_avx512::<W, 1, 16>([xr(0)], std::array::from_fn(|d| wr(c + d)), 16 * k);
                _mm512_storeu_ps(lanes.as_mut_ptr(), v);
                put(0, c, &lanes);
                c += 16;
            }
        }
        while c + 4 <= rows {
            let wc: [&[W]; 4] = std::array::from_fn(|d| wr(c + d));
            let mut i = 0;
            while i + 4 <= m {
                let ahead = if i == 0 { 4 * k } else { 0 };
                let v = tile16_avx512::<W, 4, 4>(std::array::from_fn(|r| xr(i + r)), wc, ahead);
                _mm512_storeu_ps(lanes.as_mut_ptr(), v);
                for r in 0..4 {
                    put(i + r, c, &lanes[r * 4..r * 4 + 4]);
                }
                i += 4;
            }
            for i in i..m {
                let ahead = if i == 0 { 4 * k } else { 0 };
                put(i, c, &tile_avx512([xr(i)], wc, ahead)[0]);
            }
            c += 4;
        }
        for c in c..rows {
            for i in 0..m {
                put(i, c, &tile_avx512([xr(i)], [wr(c)], 0)[0]);
            }
        }
    }
}

fn stream_rows_portable<W: Widen>(x: &[f32], m: usize, k: usize, w_rows: &[W], j0: usize, n: usize, out: OutPtr) {
    stream_rows_with!(tile, x, m, k, w_rows, j0, n, out)
}

fn stream_rows<W: Widen>(x: &[f32], m: usize, k: usize, w_rows: &[W], j0: usize, n: usize, out: OutPtr) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        // SAFETY: the features are present (AVX-512F implies AVX2).
        return unsafe { stream_rows_avx512(x, m, k, w_rows, j0, n, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        // SAFETY: the features are present.
        return unsafe { stream_rows_avx2(x, m, k, w_rows, j0, n, out) };
    }
    stream_rows_portable(x, m, k, w_rows, j0, n, out)
}

/// Weight rows per parallel task of a streamed product with `n` of them: enough tasks to
/// balance the threads, few enough that scheduling them costs nothing.
pub(super) fn rows_per_task(n: usize) -> usize {
    n.div_ceil(rayon::current_num_threads() * 8).next_multiple_of(8).max(STREAM_MIN_ROWS_PER_TASK)
}

pub(super) fn matmul_t_stream<W: Widen>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, out: &mut [f32]) {
    let ptr = OutPtr(out.as_mut_ptr());
    // Input rows that start off a 64-byte boundary (the allocator's 16-byte alignment) make
    // half the 32-byte loads straddle two cache lines; input rows are read once per weight
    // tile, so with several of them an aligned copy pays (measured: 11 % on 32 × 256 × 100K).
    let mut copy = Vec::new();
    let x = if m > 1 && x.as_ptr().align_offset(64) != 0 && (k * 4).is_multiple_of(64) {
        copy.resize(x.len() + 16, 0f32);
        let start = copy.as_ptr().align_offset(64).min(16);
        copy[start..start + x.len()].copy_from_slice(x);
        &copy[start..start + x.len()]
    } else {
        x
    };
    let per_task = rows_per_task(n);
    #[cfg(target_arch = "x86_64")]
    if super::matmul_outer::pays(m) {
        let xt = super::matmul_outer::pack_transposed(x, m, k);
        // SAFETY: available(m) holds; each task writes only its own weight rows' columns.
        w.par_chunks(per_task * k).enumerate().for_each(|(b, rows)| unsafe {
            super::matmul_outer::stream_rows(&xt, m, k, rows, b * per_task, n, ptr.raw())
        });
        return;
    }
    w.par_chunks(per_task * k).enumerate().for_each(|(b, rows)| stream_rows(x, m, k, rows, b * per_task, n, ptr));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::tests::SHAPES;
    use crate::kernels::matmul::{matmul_t_reference, STREAM_MAX_ROWS};
    use crate::kernels::testutil::{assert_close, randn};

    type Kernel<W> = fn(&[f32], usize, usize, &[W], usize, usize, OutPtr);

    /// Every kernel this CPU can run, not only the fastest: the AVX2 tiles stay tested on
    /// AVX-512 machines.
    #[test]
    fn every_simd_level_matches_the_reference() {
        use half::bf16;
        for &(m, k, n) in SHAPES.iter().filter(|s| s.0 <= STREAM_MAX_ROWS) {
            let x = randn(m * k, m as u64 + 21);
            let w = randn(n * k, n as u64 + 22);
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let widened: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let (want, want_b) = (matmul_t_reference(&x, m, k, &w, n), matmul_t_reference(&x, m, k, &widened, n));
            let mut levels: Vec<(&str, Kernel<f32>, Kernel<bf16>)> =
                vec![("portable", stream_rows_portable::<f32>, stream_rows_portable::<bf16>)];
            #[cfg(target_arch = "x86_64")]
            {
                let has = |f: &str| {
                    std::arch::is_x86_feature_detected!("fma")
                        && std::arch::is_x86_feature_detected!("f16c")
                        && match f {
                            "avx2" => std::arch::is_x86_feature_detected!("avx2"),
                            _ => std::arch::is_x86_feature_detected!("avx512f"),
                        }
                };
                // SAFETY (both): called only where the features are present.
                if has("avx2") {
                    levels.push((
                        "avx2",
                        |x, m, k, w, j0, n, o| unsafe { stream_rows_avx2(x, m, k, w, j0, n, o) },
                        |x, m, k, w, j0, n, o| unsafe { stream_rows_avx2(x, m, k, w, j0, n, o) },
                    ));
                }
                if has("avx512") {
                    levels.push((
                        "avx512",
                        |x, m, k, w, j0, n, o| unsafe { stream_rows_avx512(x, m, k, w, j0, n, o) },
                        |x, m, k, w, j0, n, o| unsafe { stream_rows_avx512(x, m, k, w, j0, n, o) },
                    ));
                }
            }
            for (name, f32_kernel, bf16_kernel) in levels {
                let mut out = vec![f32::NAN; m * n];
                f32_kernel(&x, m, k, &w, 0, n, OutPtr(out.as_mut_ptr()));
                assert_close(&out, &want, 1e-5, &format!("{name} m={m} k={k} n={n}"));
                bf16_kernel(&x, m, k, &wb, 0, n, OutPtr(out.as_mut_ptr()));
                assert_close(&out, &want_b, 1e-5, &format!("{name} bf16 m={m} k={k} n={n}"));
            }
        }
    }

    #[test]
    fn portable_tiles_match_the_reference() {
        let (m, k, n) = (5, 70, 11);
        let x = randn(m * k, 3);
        let w = randn(n * k, 4);
        let mut out = vec![0.0; m * n];
        stream_rows_portable(&x, m, k, &w, 0, n, OutPtr(out.as_mut_ptr()));
        assert_close(&out, &matmul_t_reference(&x, m, k, &w, n), 1e-5, "portable");
    }
}
