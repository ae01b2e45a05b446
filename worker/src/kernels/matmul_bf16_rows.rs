//! `out = bf16(x) · wᵀ` for up to 64 input rows (batched decode, a prompt's short last chunk) on
//! AVX512_BF16, reading the weights as the checkpoint stores them: each weight is read from
//! memory once per product and no packed copy is made or kept.
//!
//! The GEMM of `matmul_bf16` packs the weights into panels on every call. That pays where
//! hundreds of rows share them; for a decode step's few rows it would read them three times
//! (once to pack, once to write the panels, once to multiply). Here, as in the f32 kernel of
//! `matmul_outer`, the input rows are transposed into row blocks of 16 lanes, as bf16 pairs
//! (lane l at pair p holds row l's `(x[2p], x[2p + 1])`). A pair of one weight row lies in
//! memory as one 32-bit word, so it is broadcast into a register as it is and multiplied into
//! each row block by one `vdpbf16ps`. That is 32 products per instruction, where the f32
//! kernel widens each weight first and makes 16. Every accumulator holds finished results: no
//! horizontal sums.
//!
//! The kernel is written once over [`Isa`], the six register operations it needs, so that the
//! same code runs on a plain-Rust model of the instructions on every CPU (the tests), and on
//! AVX-512 where the CPU has AVX512_BF16.

use half::bf16;
use rayon::prelude::*;

use super::matmul_bf16::{pairs, round_row_fastest, Job, Lines};
use super::matmul_stream::{rows_per_task, OutPtr};

/// Lanes of a register: input rows per row block.
const LANES: usize = 16;
/// The most input rows the kernel takes: four row blocks.
pub(super) const MAX_ROWS: usize = 4 * LANES;

/// Whether this CPU runs the kernel: it has AVX512_BF16.
pub(super) fn available() -> bool {
    super::matmul_bf16::avx512_bf16()
}

/// Each `(w [n, k], n, out [m, n])` of `jobs`, for 1 to [`MAX_ROWS`] rows of `x [m, k]` and
/// k > 0: every element of every `out` written.
///
/// # Panics
/// Where [`available`] is false, or on shapes outside those.
pub(super) fn matmul(x: &[f32], m: usize, k: usize, jobs: &mut [Job]) {
    assert!(available(), "matmul_bf16_rows needs AVX512_BF16");
    #[cfg(target_arch = "x86_64")]
    matmul_with(x, m, k, jobs, x86::band);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, m, k, jobs);
        unreachable!("AVX512_BF16 is detected on x86_64 only");
    }
}

/// One task's product: every row of the transposed input `xt` against the weight rows
/// `w_rows`, into columns `j0..` of the `[m, n]` result at `out`.
type Band = unsafe fn(xt: &[u32], m: usize, k: usize, w_rows: &[bf16], j0: usize, n: usize, out: *mut f32);

/// The product with `band` for each task's weight rows: the AVX-512 one, or the model's in tests.
fn matmul_with(x: &[f32], m: usize, k: usize, jobs: &mut [Job], band: Band) {
    assert!((1..=MAX_ROWS).contains(&m) && k > 0 && x.len() == m * k, "matmul_bf16_rows: x is not [1..=64, k > 0]");
    let xt = pack_transposed(x, m, k);
    for (w, n, out) in jobs.iter_mut() {
        let n = *n;
        assert!(w.len() == n * k && out.len() == m * n, "matmul_bf16_rows: w is not [n, k] or out not [m, n]");
        if n == 0 {
            continue;
        }
        let out = OutPtr(out.as_mut_ptr().cast::<f32>());
        let per_task = rows_per_task(n);
        // SAFETY: `xt` is `m` rows transposed for `k`; each task writes only its own weight
        // rows' columns of the `[m, n]` result; `band` is the model or the CPU has AVX512_BF16
        // (asserted by the caller).
        w.par_chunks(per_task * k)
            .enumerate()
            .for_each(|(t, rows)| unsafe { band(&xt, m, k, rows, t * per_task, n, out.raw()) });
    }
}

/// `x [m, k]` rounded to bf16 pairs and transposed into row blocks of sixteen:
/// `xt[(b · pairs(k) + p) · 16 + l]` holds row `b · 16 + l`'s pair p; zeros past the last row
/// and in the upper half of an odd k's last pair.
///
/// On the calling thread, a row at a time: at most 64 rows, a few microseconds, where a
/// parallel region would cost as much as the work on every product of a decode step.
fn pack_transposed(x: &[f32], m: usize, k: usize) -> Lines {
    let kp = pairs(k);
    let round = round_row_fastest();
    let mut row = vec![0u32; kp];
    let mut xt = Lines::zeroed(m.div_ceil(LANES) * kp * LANES);
    for (i, src) in x.chunks_exact(k).take(m).enumerate() {
        round(src, &mut row);
        let (b, l) = (i / LANES, i % LANES);
        for (p, &pair) in row.iter().enumerate() {
            xt[(b * kp + p) * LANES + l] = pair;
        }
    }
    xt
}

/// The register operations of the kernel, on 16 lanes.
trait Isa {
    /// 16 f32 sums.
    type Acc: Copy;
    /// 16 pairs of bf16.
    type Pairs: Copy;
    unsafe fn zero() -> Self::Acc;
    /// The 16 pairs at `p`.
    unsafe fn load(p: *const u32) -> Self::Pairs;
    /// One pair in every lane.
    unsafe fn splat(pair: u32) -> Self::Pairs;
    /// `acc + a · b` lane by lane, as `vdpbf16ps` sums a lane: the product of the odd elements
    /// added to it, then that of the even ones (each product exact in f32, each sum rounded).
    unsafe fn dot(acc: Self::Acc, a: Self::Pairs, b: Self::Pairs) -> Self::Acc;
    unsafe fn store(acc: Self::Acc, p: *mut f32);
    /// A hint that the line at `p` is read soon (any address: it never faults).
    unsafe fn prefetch(p: *const bf16);
}

/// Plain-Rust model of the instructions, for the tests on any CPU. Inputs and results that
/// are subnormal are kept, where `vdpbf16ps` takes and makes zeros; the tests' values are
/// normal.
#[cfg(test)]
struct Model;

#[cfg(test)]
impl Isa for Model {
    type Acc = [f32; LANES];
    type Pairs = [u32; LANES];
    unsafe fn zero() -> Self::Acc {
        [0.0; LANES]
    }
    unsafe fn load(p: *const u32) -> Self::Pairs {
        std::array::from_fn(|l| *p.add(l))
    }
    unsafe fn splat(pair: u32) -> Self::Pairs {
        [pair; LANES]
    }
    unsafe fn dot(acc: Self::Acc, a: Self::Pairs, b: Self::Pairs) -> Self::Acc {
        let lo = |v: u32| f32::from_bits(v << 16);
        let hi = |v: u32| f32::from_bits(v & 0xffff_0000);
        std::array::from_fn(|l| acc[l] + hi(a[l]) * hi(b[l]) + lo(a[l]) * lo(b[l]))
    }
    unsafe fn store(acc: Self::Acc, p: *mut f32) {
        for (l, v) in acc.into_iter().enumerate() {
            *p.add(l) = v;
        }
    }
    unsafe fn prefetch(_: *const bf16) {}
}

/// [`Band`] on `I`: weight rows `C` at a time against `B` row blocks (`B · C` accumulators),
/// the rest `C2`, `C3` and then one at a time; `B` from `m`.
///
/// # Safety
/// `xt` is `m` rows transposed for `k` ([`pack_transposed`]); `out` points at an `[m, n]` result
/// whose columns `j0..j0 + w_rows.len() / k` no other thread touches meanwhile; `I` runs on
/// this CPU.
#[inline(always)]
unsafe fn band<I: Isa>(xt: &[u32], m: usize, k: usize, w_rows: &[bf16], j0: usize, n: usize, out: *mut f32) {
    match m.div_ceil(LANES) {
        1 => rows_with::<I, 1, 16, 8, 4>(xt, m, k, w_rows, j0, n, out),
        2 => rows_with::<I, 2, 12, 8, 4>(xt, m, k, w_rows, j0, n, out),
        3 => rows_with::<I, 3, 8, 4, 2>(xt, m, k, w_rows, j0, n, out),
        _ => rows_with::<I, 4, 6, 3, 2>(xt, m, k, w_rows, j0, n, out),
    }
}

/// Accumulators a tile may hold, leaving the row blocks' inputs and a broadcast room in 32
/// registers.
const ACCUMULATORS: usize = 24;

#[inline(always)]
unsafe fn rows_with<I: Isa, const B: usize, const C: usize, const C2: usize, const C3: usize>(
    xt: &[u32],
    m: usize,
    k: usize,
    w_rows: &[bf16],
    j0: usize,
    n: usize,
    out: *mut f32,
) {
    const { assert!(B * C <= ACCUMULATORS && C2 < C && C3 < C2) };
    assert!(m.div_ceil(LANES) == B && xt.len() == B * pairs(k) * LANES && w_rows.len().is_multiple_of(k));
    let rows = w_rows.len() / k;
    assert!(j0 + rows <= n, "weight rows beyond the result's columns");
    let mut c = 0;
    while c < rows {
        let tile = [C, C2, C3, 1].into_iter().find(|&t| c + t <= rows).expect("1 <= rows - c");
        let w = &w_rows[c * k..(c + tile) * k];
        // The next tile's rows, prefetched while this one is multiplied.
        let next = w_rows.as_ptr().wrapping_add((c + tile) * k);
        match tile {
            t if t == C => tile_product::<I, B, C>(xt, m, k, w, next, j0 + c, n, out),
            t if t == C2 => tile_product::<I, B, C2>(xt, m, k, w, next, j0 + c, n, out),
            t if t == C3 => tile_product::<I, B, C3>(xt, m, k, w, next, j0 + c, n, out),
            _ => tile_product::<I, B, 1>(xt, m, k, w, next, j0 + c, n, out),
        }
        c += tile;
    }
}

/// `B` row blocks of `xt` against the `C` weight rows `w` (`C × k`), stored into columns
/// `j..j + C` of `out`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_product<I: Isa, const B: usize, const C: usize>(
    xt: &[u32],
    m: usize,
    k: usize,
    w: &[bf16],
    next: *const bf16,
    j: usize,
    n: usize,
    out: *mut f32,
) {
    let kp = pairs(k);
    assert!(w.len() == C * k && xt.len() == B * kp * LANES);
    let (xp, wp) = (xt.as_ptr(), w.as_ptr());
    let mut acc = [[I::zero(); C]; B];
    // A weight row's pair p is the 32-bit word at element 2p, for every p below k / 2; an odd
    // k's last element is multiplied alone, its pair's upper half zero in `xt` and here.
    for p in 0..k / 2 {
        // One cache line of a row holds 16 pairs.
        if p % 16 == 0 {
            for c in 0..C {
                I::prefetch(next.wrapping_add(c * k + 2 * p));
            }
        }
        // SAFETY (loads): p < k / 2, so every index lies inside xt (B × kp × 16 pairs) and
        // both halves of the word inside row c of w.
        let xv: [I::Pairs; B] = std::array::from_fn(|b| I::load(xp.add((b * kp + p) * LANES)));
        for c in 0..C {
            let wv = I::splat(wp.add(c * k + 2 * p).cast::<u32>().read_unaligned());
            for b in 0..B {
                acc[b][c] = I::dot(acc[b][c], xv[b], wv);
            }
        }
    }
    if k % 2 == 1 {
        let p = k / 2;
        let xv: [I::Pairs; B] = std::array::from_fn(|b| I::load(xp.add((b * kp + p) * LANES)));
        for c in 0..C {
            let wv = I::splat((*wp.add(c * k + k - 1)).to_bits() as u32);
            for b in 0..B {
                acc[b][c] = I::dot(acc[b][c], xv[b], wv);
            }
        }
    }
    let mut lanes = [0f32; LANES];
    for b in 0..B {
        let valid = (m - b * LANES).min(LANES);
        for c in 0..C {
            I::store(acc[b][c], lanes.as_mut_ptr());
            for (l, &v) in lanes[..valid].iter().enumerate() {
                // SAFETY: row b·16 + l < m and column j + c < n: inside the result, in this
                // task's columns.
                *out.add((b * LANES + l) * n + j + c) = v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::bf16;

    use super::{band as band_on, Isa};

    /// The kernel on AVX-512 registers.
    ///
    /// # Safety
    /// As [`super::band`]; the CPU has AVX512_BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn band(xt: &[u32], m: usize, k: usize, w: &[bf16], j0: usize, n: usize, out: *mut f32) {
        band_on::<Avx512>(xt, m, k, w, j0, n, out)
    }

    struct Avx512;

    impl Isa for Avx512 {
        type Acc = __m512;
        type Pairs = __m512i;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const u32) -> __m512i {
            _mm512_loadu_si512(p.cast())
        }
        #[inline(always)]
        unsafe fn splat(pair: u32) -> __m512i {
            _mm512_set1_epi32(pair as i32)
        }
        #[inline(always)]
        unsafe fn dot(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
            _mm512_dpbf16_ps(
                acc,
                std::mem::transmute::<__m512i, __m512bh>(a),
                std::mem::transmute::<__m512i, __m512bh>(b),
            )
        }
        #[inline(always)]
        unsafe fn store(acc: __m512, p: *mut f32) {
            _mm512_storeu_ps(p, acc)
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const bf16) {
            _mm_prefetch::<_MM_HINT_T0>(p.cast())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::MaybeUninit;

    use super::*;
    use crate::kernels::matmul_bf16::check_products;
    use crate::kernels::testutil::randn;

    /// [`Band`] on the model.
    unsafe fn band_model(xt: &[u32], m: usize, k: usize, w: &[bf16], j0: usize, n: usize, out: *mut f32) {
        band::<Model>(xt, m, k, w, j0, n, out)
    }

    /// Products of one call through `band` at `m` rows, `k`, and weights of each of `ns` rows,
    /// each checked against the definition.
    fn check(band: Band, m: usize, k: usize, ns: &[usize]) {
        check_products(|x, m, k, jobs| matmul_with(x, m, k, jobs, band), m, k, ns);
    }

    /// Rows within, at and past each row block; k of one element, odd, within a cache line of
    /// pairs, at and past one; weight counts that end in every tile size, and several tasks
    /// (each of at least 32 rows: `rows_per_task`).
    const ROWS: &[usize] = &[1, 2, 15, 16, 17, 32, 33, 48, 50, 64];
    const KS: &[usize] = &[1, 2, 3, 31, 32, 33, 64, 257];
    const NS: &[usize] = &[23, 0, 1, 5, 7, 13, 16, 29, 150];

    /// The whole product (rounding, transposing, tasks, tiles, tails, stores) on the model of
    /// the instructions, on any CPU.
    #[test]
    fn product_on_the_model_matches_the_definition() {
        for &m in ROWS {
            for &k in KS {
                check(band_model, m, k, NS);
            }
        }
    }

    /// The model multiplies like elements of a pair (even by even, odd by odd) and adds both.
    #[test]
    fn model_multiplies_pairs_element_by_element() {
        let pair =
            |even: f32, odd: f32| bf16::from_f32(even).to_bits() as u32 | (bf16::from_f32(odd).to_bits() as u32) << 16;
        // SAFETY: the model touches no memory.
        let got = unsafe { Model::dot([1.0; LANES], Model::splat(pair(2.0, 3.0)), Model::splat(pair(5.0, 7.0))) };
        assert_eq!(got, [1.0 + 2.0 * 5.0 + 3.0 * 7.0; LANES]);
    }

    #[test]
    fn packing_transposes_rounded_pairs_into_zero_padded_row_blocks() {
        let (m, k) = (18, 5);
        let x: Vec<f32> = (0..m * k).map(|i| i as f32 + 0.25).collect();
        let xt = pack_transposed(&x, m, k);
        let kp = pairs(k);
        assert_eq!(xt.len(), 2 * kp * LANES);
        for b in 0..2 {
            for p in 0..kp {
                for l in 0..LANES {
                    let i = b * LANES + l;
                    let at = |c: usize| if i < m && c < k { bf16::from_f32(x[i * k + c]).to_bits() as u32 } else { 0 };
                    assert_eq!(
                        xt[(b * kp + p) * LANES + l],
                        at(2 * p) | at(2 * p + 1) << 16,
                        "block {b} pair {p} lane {l}"
                    );
                }
            }
        }
    }

    /// The AVX-512 kernel where the CPU has AVX512_BF16, against the definition as the model is.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn product_on_avx512_bf16_matches_the_definition() {
        if !available() {
            eprintln!("no AVX512_BF16 on this CPU: the kernel's AVX-512 form is not run here");
            return;
        }
        for &m in ROWS {
            for &k in KS {
                check(x86::band, m, k, NS);
            }
        }
        // Whether the silicon sums in the model's order (the SDM's): said, not asserted, since
        // the bound above is what the engine relies on and vendors may differ in it.
        let (m, k, n) = (33, 257, 150);
        let x = randn(m * k, 5);
        let w: Vec<bf16> = randn(n * k, 6).into_iter().map(bf16::from_f32).collect();
        let run = |band: Band| {
            let mut out = vec![MaybeUninit::new(f32::NAN); m * n];
            matmul_with(&x, m, k, &mut [(&w, n, &mut out)], band);
            // SAFETY: every element written (checked above on the same shapes).
            out.iter().map(|v| unsafe { v.assume_init() }.to_bits()).collect::<Vec<u32>>()
        };
        let (silicon, model) = (run(x86::band), run(band_model));
        let differ = silicon.iter().zip(&model).filter(|(a, b)| a != b).count();
        eprintln!("vdpbf16ps against the model: {differ} of {} results differ in their bits", m * n);
    }
}
