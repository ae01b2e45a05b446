//! `out = x · wᵀ` in bf16 with f32 accumulation, for products of [`MIN_ROWS`] rows or more
//! ([`runs`]: prefill's large ones here, up to 64 rows on `matmul_bf16_rows` where it runs):
//! the activations `x [m, k]` are rounded to bf16 (round to nearest even, as PyTorch and oneDNN
//! round), the weights `w [n, k]` are bf16 as the checkpoint stores them, and every product of a
//! pair of bf16 values is accumulated in f32 — what `vdpbf16ps` (AVX512_BF16: Zen 4 and later,
//! Intel Cooper Lake and Sapphire Rapids) computes at twice the rate of f32 FMA.
//!
//! The layout follows the instruction: it multiplies pairs of adjacent k (two bf16 in each
//! 32-bit lane) and adds both products to one f32 lane. A row of `x` rounded to bf16 is already
//! such pairs, so only the weights are packed: panels of 32 weight rows (two registers of 16
//! lanes) over the whole of k, pair-interleaved, zero-padded past `n` and past an odd `k`. The
//! register tile is 12 rows × 32 columns (24 of the 32 registers accumulate) over all of k, so
//! each output is written once; each k-pair step loads two weight registers and broadcasts one
//! pair of each row. A task takes `MC` rows and runs every panel over them: its rows stay in L2 while a
//! panel (k × 128 bytes) is read once per 12 of them, from L2 as well. Measured on Zen 4 (2
//! threads): the 2048³ product ran at 285–320 GFLOP/s with 256-wide k blocks (whose outputs are
//! read back and added), 371–415 without; 12-row tiles took the small preset's 16K prefill from
//! 8.2–8.8K to 9.2–9.3K tokens/s against 8-row ones.
//!
//! Where the CPU has AMX (Intel Sapphire Rapids and later), the same product runs on its tiles
//! instead (`matmul_amx`), over the same packed panels; [`kernel`] says which one this process
//! runs.
//!
//! [`matmul_t_bf16_reference`] is the plain definition the kernels are tested against: each
//! product of the rounded operands is exact in f32, so they differ only by the order of f32
//! additions.

use std::mem::MaybeUninit;

use half::bf16;
use rayon::prelude::*;

use super::matmul_bf16_rows;

/// Columns per panel (two registers of 16 f32 lanes) and rows per register tile.
pub(super) const NR: usize = 32;
const MR: usize = 12;
/// Rows per parallel task, whole tiles: its activation block (MC × k bf16: 132 KiB at k = 1408)
/// stays in L2 while every panel passes over it. Measured on the small preset's prefill: 48
/// (9.3–9.8K tokens/s) against 64 (9.0–9.6K, a 4-row tile per task), 72 and 96 (down to 8.0K).
const MC: usize = 48;

/// The instructions a bf16 product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles (`tdpbf16ps`): Intel Sapphire Rapids and later.
    Amx,
    /// AVX-512 registers (`vdpbf16ps`): AMD Zen 4 and later, Intel Cooper Lake and later.
    Avx512Bf16,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx",
            Kernel::Avx512Bf16 => "avx512bf16",
        }
    }
}

/// The environment variable that picks the kernel of products over 64 rows where the CPU has
/// both (`amx`, `avx512bf16`; `auto` or unset: AMX), so that the two can be measured against
/// each other on one machine. Fewer rows run on `vdpbf16ps` whatever it says.
pub const KERNEL_ENV: &str = "YOCO_BF16_KERNEL";

/// The kernel this process runs bf16 products on, `None` where the CPU has neither (they then
/// stay f32). Decided once: AMX where the CPU and the OS give it, else `vdpbf16ps`.
pub fn kernel() -> Option<Kernel> {
    static KERNEL: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        let wanted = std::env::var(KERNEL_ENV).unwrap_or_default();
        let amx = || crate::kernels::matmul_amx::available().then_some(Kernel::Amx);
        let avx512 = avx512_bf16().then_some(Kernel::Avx512Bf16);
        match wanted.as_str() {
            "avx512bf16" => avx512,
            "amx" => amx().or_else(|| {
                tracing::warn!("{KERNEL_ENV}=amx, but this CPU or OS gives no AMX tiles");
                avx512
            }),
            other => {
                if !matches!(other, "" | "auto") {
                    tracing::warn!("{KERNEL_ENV}={other:?} is not amx, avx512bf16 or auto: choosing as for auto");
                }
                amx().or(avx512)
            }
        }
    })
}

/// Whether this CPU runs a bf16 kernel (see [`kernel`]).
pub fn available() -> bool {
    kernel().is_some()
}

/// The fewest input rows a product takes in bf16. Fewer are bound by reading the weights
/// whatever the arithmetic, so they keep their f32 activations (a single sequence's decode
/// step among them). By estimate for Zen 4, not measured: the f32 stream stays at the read
/// rate up to about 7 rows (two cores' 256-bit FMAs against about 15 GB/s each), and the
/// bf16 row kernel spends a whole 16-lane `vdpbf16ps` per weight pair however few rows fill
/// its lanes. `kernel_bench`'s `bf16 w ms` and `bf16 ms` columns measure it.
pub const MIN_ROWS: usize = 8;

/// Whether this CPU runs a product of `m` input rows in bf16: from [`MIN_ROWS`] rows where it
/// has AVX512_BF16 (up to 64 rows on `matmul_bf16_rows`, which reads the weights as stored,
/// beyond on the GEMM); on AMX alone only beyond 64 rows, since the tiles take packed weights
/// and packing them on every call would read a decode step's weights three times.
pub fn runs(m: usize) -> bool {
    m >= MIN_ROWS && available() && (m > matmul_bf16_rows::MAX_ROWS || on_rows_kernel(m))
}

/// Whether a product of `m` rows runs on `matmul_bf16_rows` rather than a GEMM.
fn on_rows_kernel(m: usize) -> bool {
    m <= matmul_bf16_rows::MAX_ROWS && matmul_bf16_rows::available()
}

/// Whether this CPU has `vdpbf16ps` (and the AVX-512 it extends), which also rounds rows to bf16
/// 32 at a time.
pub(super) fn avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[m, n] = bf16(x)[m, k] · w[n, k]ᵀ`, f32 accumulation. Panics if the CPU has no bf16
/// kernel (see [`available`]) or the shapes are wrong.
pub fn matmul_t_bf16(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize, out: &mut [f32]) {
    assert_eq!(out.len(), m * n, "matmul_t_bf16: out is not [m, n]");
    // SAFETY: the kernel writes only initialised f32 values (every element of `out`).
    let out = unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) };
    matmul_t_bf16_into(x, m, k, &mut [(w, n, out)]);
}

/// `bf16(x) · wᵀ` for several weights sharing the input `x [m, k]` (a layer's q, k, v and gate
/// projections; an FFN's fc1 and gate), each `[n, k]`, into new `[m, n]` outputs: `x` is
/// rounded once. The outputs are written once, never zeroed first (zeroing them took a
/// twentieth of a prefill).
pub fn matmul_t_bf16_many(x: &[f32], m: usize, k: usize, ws: &[(&[bf16], usize)]) -> Vec<Vec<f32>> {
    let mut outs: Vec<Vec<f32>> = ws.iter().map(|&(_, n)| Vec::with_capacity(m * n)).collect();
    let mut jobs: Vec<Job> =
        ws.iter().zip(&mut outs).map(|(&(w, n), out)| (w, n, &mut out.spare_capacity_mut()[..m * n])).collect();
    matmul_t_bf16_into(x, m, k, &mut jobs);
    for (out, &(_, n)) in outs.iter_mut().zip(ws) {
        // SAFETY: `matmul_t_bf16_into` wrote all m · n elements (it panics otherwise).
        unsafe { out.set_len(m * n) };
    }
    outs
}

/// One product of [`matmul_t_bf16_into`]: the weights `[n, k]`, n, and the output `[m, n]`.
pub(super) type Job<'a> = (&'a [bf16], usize, &'a mut [MaybeUninit<f32>]);

/// Every `(w [n, k], n, out [m, n])` of `jobs`: each element of each `out` written.
fn matmul_t_bf16_into(x: &[f32], m: usize, k: usize, jobs: &mut [Job]) {
    assert_eq!(x.len(), m * k, "matmul_t_bf16: x is not [m, k]");
    for (w, n, out) in jobs.iter() {
        assert_eq!(w.len(), n * k, "matmul_t_bf16: w is not [n, k]");
        assert_eq!(out.len(), m * n, "matmul_t_bf16: out is not [m, n]");
    }
    let kernel = kernel().expect("matmul_t_bf16 needs AMX or AVX512_BF16");
    if m == 0 {
        return;
    }
    if k == 0 {
        for (_, _, out) in jobs.iter_mut() {
            out.fill(MaybeUninit::new(0.0));
        }
        return;
    }
    if on_rows_kernel(m) {
        return matmul_bf16_rows::matmul(x, m, k, jobs);
    }
    match kernel {
        Kernel::Amx => crate::kernels::matmul_amx::matmul(x, m, k, jobs),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Bf16 => x86::matmul(x, m, k, jobs),
        #[cfg(not(target_arch = "x86_64"))]
        Kernel::Avx512Bf16 => unreachable!("AVX512_BF16 is detected on x86_64 only"),
    }
}

/// The definition: each operand rounded to bf16, products and sums in f32 (k in order).
pub fn matmul_t_bf16_reference(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize, out: &mut [f32]) {
    for i in 0..m {
        let row: Vec<f32> = x[i * k..(i + 1) * k].iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        for j in 0..n {
            out[i * n + j] = row.iter().zip(&w[j * k..(j + 1) * k]).map(|(a, b)| a * b.to_f32()).sum();
        }
    }
}

/// Pairs of bf16 (a 32-bit lane each) per k: k rounded up to even, halved.
pub(super) fn pairs(k: usize) -> usize {
    k.div_ceil(2)
}

/// A zeroed `[u32]` that starts on a 64-byte boundary: a panel row (128 bytes), an AVX-512
/// load from it or a 64-byte tile row then never spans two cache lines, as it would from the
/// allocator's 16-byte alignment.
pub(super) struct Lines {
    buf: Vec<u32>,
    at: usize,
    len: usize,
}

impl Lines {
    pub(super) fn zeroed(len: usize) -> Self {
        let buf = vec![0u32; len + 15];
        let at = buf.as_ptr().align_offset(64);
        Lines { buf, at, len }
    }
}

impl std::ops::Deref for Lines {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.buf[self.at..self.at + self.len]
    }
}

impl std::ops::DerefMut for Lines {
    fn deref_mut(&mut self) -> &mut [u32] {
        &mut self.buf[self.at..self.at + self.len]
    }
}

/// `x [m, k]` as bf16 pairs, `lanes ≥ pairs(k)` per row and `rows ≥ m` rows, zeros past k (a
/// zero pairs the last value of an odd k) and past m, rounded to nearest even (`round_row`: 32
/// at a time where the CPU converts them).
pub(super) fn round_rows(
    x: &[f32],
    m: usize,
    k: usize,
    rows: usize,
    lanes: usize,
    round_row: fn(&[f32], &mut [u32]),
) -> Lines {
    debug_assert!(rows >= m && lanes >= pairs(k));
    let mut out = Lines::zeroed(rows * lanes);
    out[..m * lanes]
        .par_chunks_mut(lanes)
        .zip(x.par_chunks(k))
        .for_each(|(dst, src)| round_row(src, &mut dst[..pairs(k)]));
    out
}

/// The fastest row rounding this CPU has: 32 values per instruction with AVX512_BF16, else
/// [`round_pairs`].
pub(super) fn round_row_fastest() -> fn(&[f32], &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512_bf16() {
        // SAFETY: the CPU has the instructions (checked just above).
        return |src, dst| unsafe { x86::round_row(src, dst) };
    }
    round_pairs
}

/// One row's pairs, one at a time (the tail of a vectorised row, and the definition).
pub(super) fn round_pairs(src: &[f32], dst: &mut [u32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks(2)) {
        let lo = bf16::from_f32(s[0]).to_bits() as u32;
        let hi = s.get(1).map_or(0, |&v| bf16::from_f32(v).to_bits() as u32);
        *d = lo | (hi << 16);
    }
}

/// The weights' panels: per panel of 32 rows, per pair p < `lanes` (≥ `pairs(k)`), 32 lanes
/// (row j's `(w[j, 2p], w[j, 2p + 1])`), zeros past `n` and past k.
pub(super) fn pack_panels(w: &[bf16], n: usize, k: usize, lanes: usize, panels: &mut [u32]) {
    panels.par_chunks_mut(lanes * NR).enumerate().for_each(|(panel, dst)| {
        for c in 0..NR {
            let j = panel * NR + c;
            for p in 0..lanes {
                let at = 2 * p;
                dst[p * NR + c] = if j < n && at < k {
                    let lo = w[j * k + at].to_bits() as u32;
                    let hi = if at + 1 < k { w[j * k + at + 1].to_bits() as u32 } else { 0 };
                    lo | (hi << 16)
                } else {
                    0
                };
            }
        }
    });
}

/// One task's share of one panel, as [`for_each_panel`] hands it to a kernel: output rows
/// `i0..i0 + rows` of the product (`out`: those rows, `n` columns each), against panel `b`
/// (`lanes` pairs of [`NR`] columns), whose columns are `col0..col0 + cols` of `out`.
pub(super) struct PanelTask<'a> {
    pub i0: usize,
    pub rows: usize,
    pub n: usize,
    pub col0: usize,
    pub cols: usize,
    pub b: &'a [u32],
}

/// The driver of both bf16 kernels: each `(w, n, out)` of `jobs`, its weights packed into panels
/// of `lanes` pairs, `out` split into tasks of `task_rows` rows that run in parallel, each
/// calling `kernel` for every panel in turn. One product after another, each parallel over its
/// rows: a product's panels (k × n bf16) stay in each core's L2 across its tasks, where tasks
/// that ran every product over their rows streamed all of them from L3 (262 against 390
/// GFLOP/s for a retention layer's five projections at k = 512, 4096 rows, on Zen 4).
pub(super) fn for_each_panel<F>(jobs: &mut [Job], k: usize, lanes: usize, task_rows: usize, kernel: F)
where
    F: Fn(&PanelTask<'_>, &mut [MaybeUninit<f32>]) + Sync,
{
    // One buffer for the call, sized to its largest product: `pack_panels` writes every element
    // of the share it is given, so nothing of an earlier product is left to read.
    let len = |n: usize| n.div_ceil(NR) * lanes * NR;
    let mut buf = Lines::zeroed(jobs.iter().map(|&(_, n, _)| len(n)).max().unwrap_or(0));
    for (w, n, out) in jobs.iter_mut() {
        let n = *n;
        if n == 0 {
            continue;
        }
        let packed = &mut buf[..len(n)];
        pack_panels(w, n, k, lanes, packed);
        let packed = &*packed;
        out.par_chunks_mut(task_rows * n).enumerate().for_each(|(task, out)| {
            for panel in 0..n.div_ceil(NR) {
                let b = &packed[panel * lanes * NR..(panel + 1) * lanes * NR];
                let col0 = panel * NR;
                let t = PanelTask { i0: task * task_rows, rows: out.len() / n, n, col0, cols: NR.min(n - col0), b };
                kernel(&t, out);
            }
        });
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::{for_each_panel, pairs, round_pairs, round_row_fastest, round_rows, Job, MC, MR, NR};

    pub(super) fn matmul(x: &[f32], m: usize, k: usize, jobs: &mut [Job]) {
        let kp = pairs(k);
        let xb = round_rows(x, m, k, m, kp, round_row_fastest());
        for_each_panel(jobs, k, kp, MC, |t, out| {
            for r0 in (0..t.rows).step_by(MR) {
                let mr = MR.min(t.rows - r0);
                let a = &xb[(t.i0 + r0) * kp..];
                let c = &mut out[r0 * t.n + t.col0..];
                // SAFETY: `available()` was asserted; `a` holds mr rows of kp lanes, `b` kp × NR
                // lanes, `c` mr rows of `cols` columns at stride n.
                unsafe { tile(a, kp, t.b, kp, c, t.n, mr, t.cols) };
            }
        });
    }

    /// A row's bf16 pairs, 32 floats per conversion (`vcvtne2ps2bf16`: round to nearest even,
    /// as `half` rounds; subnormal inputs become zero), the tail one pair at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn round_row(src: &[f32], dst: &mut [u32]) {
        let full = src.len() / 32 * 32;
        for c in (0..full).step_by(32) {
            let lo = _mm512_loadu_ps(src.as_ptr().add(c));
            let hi = _mm512_loadu_ps(src.as_ptr().add(c + 16));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dst.as_mut_ptr().add(c / 2) as *mut _, v);
        }
        round_pairs(&src[full..], &mut dst[full / 2..]);
    }

    /// One register tile: `mr ≤ 12` rows of `a` (pairs, row stride `lda`) against a 32-column
    /// panel `b`, over `kp` pairs, into `cols ≤ 32` columns of `c` (row stride `ldc`).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        a: &[u32],
        lda: usize,
        b: &[u32],
        kp: usize,
        c: &mut [MaybeUninit<f32>],
        ldc: usize,
        mr: usize,
        cols: usize,
    ) {
        debug_assert!(b.len() >= kp * NR && (mr == 0 || a.len() >= (mr - 1) * lda + kp));
        debug_assert!(mr == 0 || c.len() >= (mr - 1) * ldc + cols);
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        macro_rules! step {
            ($rows:expr) => {
                for p in 0..kp {
                    let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR) as *const _));
                    let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR + 16) as *const _));
                    for r in 0..$rows {
                        let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r * lda + p) as i32));
                        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
                        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
                    }
                }
            };
        }
        // The full tile unrolled for the compiler to keep in registers; the row tail generic.
        if mr == MR {
            step!(MR);
        } else {
            step!(mr);
        }
        let mask = |lo: usize| -> __mmask16 {
            let n = cols.saturating_sub(lo).min(16);
            ((1u32 << n) - 1) as __mmask16
        };
        let (m0, m1) = (mask(0), mask(16));
        for (r, acc) in acc.iter().enumerate().take(mr) {
            let row = c.as_mut_ptr().add(r * ldc) as *mut f32;
            for (h, m) in [(0, m0), (1, m1)] {
                if m == 0 {
                    continue;
                }
                _mm512_mask_storeu_ps(row.add(16 * h), m, acc[h]);
            }
        }
    }
}

/// Asserts that `got [m, n]` is `bf16(x) · wᵀ` within the bound of any order of k f32 additions,
/// `k·ε·Σ|terms|` (which also covers the instructions' flush of subnormal products to zero).
#[cfg(test)]
pub(super) fn assert_matches_definition(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize, got: &[f32]) {
    let mut want = vec![0.0; m * n];
    matmul_t_bf16_reference(x, m, k, w, n, &mut want);
    for i in 0..m {
        for j in 0..n {
            let scale: f32 =
                (0..k).map(|p| (bf16::from_f32(x[i * k + p]).to_f32() * w[j * k + p].to_f32()).abs()).sum();
            let (g, e) = (got[i * n + j], want[i * n + j]);
            let tol = k as f32 * f32::EPSILON * scale + 1e-30;
            assert!((g - e).abs() <= tol, "({m},{k},{n}) [{i},{j}]: {g} vs {e} (scale {scale})");
        }
    }
}

/// Runs `product` on several products of one call, `m` rows of `k` and weights of each of `ns`
/// rows (each followed in memory by a NaN, so that a read past its last row shows; outputs
/// start as NaN, which marks any element left unwritten), and checks each against the
/// definition.
#[cfg(test)]
pub(super) fn check_products(product: impl Fn(&[f32], usize, usize, &mut [Job]), m: usize, k: usize, ns: &[usize]) {
    use crate::kernels::testutil::randn;
    let x = randn(m * k, 1 + m as u64 * 7 + k as u64);
    let ws: Vec<Vec<bf16>> = ns
        .iter()
        .map(|&n| randn(n * k, 2 + n as u64).into_iter().map(bf16::from_f32).chain([bf16::NAN]).collect())
        .collect();
    let mut outs: Vec<Vec<MaybeUninit<f32>>> = ns.iter().map(|&n| vec![MaybeUninit::new(f32::NAN); m * n]).collect();
    let mut jobs: Vec<Job> =
        ws.iter().zip(ns).zip(&mut outs).map(|((w, &n), out)| (&w[..n * k], n, &mut out[..])).collect();
    product(&x, m, k, &mut jobs);
    for ((w, &n), out) in ws.iter().zip(ns).zip(&outs) {
        // SAFETY: initialised with NaN.
        let got: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
        assert_matches_definition(&x, m, k, &w[..n * k], n, &got);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// The vectorised rounding is `half`'s: ties to even, infinities, NaN quiet, odd lengths
    /// (subnormal inputs, which the instruction flushes, excepted).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_rounding_is_round_to_nearest_even() {
        if !avx512_bf16() {
            return;
        }
        let mut x: Vec<f32> = values(997, 5);
        for (i, bits) in
            [0x3f80_8000u32, 0x3f81_8000, 0x3f80_7fff, 0x7f80_0000, 0xff80_0000, 0x7f7f_ffff].iter().enumerate()
        {
            x[7 * i + 3] = f32::from_bits(*bits);
        }
        for len in [997, 64, 33, 1] {
            let src = &x[..len];
            let mut want = vec![0u32; pairs(len)];
            round_pairs(src, &mut want);
            let got = round_rows(src, 1, len, 1, pairs(len), |s, d| unsafe { x86::round_row(s, d) });
            assert_eq!(&got[..], &want[..], "length {len}");
        }
        let nan = round_rows(&[f32::NAN, 1.0], 1, 2, 1, 1, |s, d| unsafe { x86::round_row(s, d) });
        assert!(bf16::from_bits(nan[0] as u16).is_nan());
    }

    /// Against the definition: every shape edge (rows past a tile and a task, columns past a
    /// panel, odd k, k past a block), within the f32 summation-order bound `k·ε·Σ|terms|`.
    #[test]
    fn matches_the_definition_at_every_edge() {
        if !available() {
            eprintln!("no bf16 kernel on this CPU: the product is not run here");
            return;
        }
        for &(m, k, n) in
            // Rows of the row kernel (up to 64) and of the GEMM, whose last tile of 12 rows is
            // partial at 65 (48 + 17: 5 rows), 77 and 130.
            &[
                (1, 1, 1),
                (3, 5, 0),
                (8, 2, 32),
                (9, 7, 33),
                (17, 1024, 100),
                (65, 7, 33),
                (77, 130, 40),
                (130, 513, 65),
                (300, 257, 31),
            ]
        {
            let x = values(m * k, 1 + m as u64);
            let w: Vec<bf16> = values(n * k, 2 + n as u64).into_iter().map(bf16::from_f32).collect();
            let mut got = vec![f32::NAN; m * n];
            matmul_t_bf16(&x, m, k, &w, n, &mut got);
            assert_matches_definition(&x, m, k, &w, n, &got);
        }
    }

    /// Several weights over one input: each output is the single product's, bit for bit (the
    /// same rounding and the same order of additions), at row counts past a task and with
    /// widths past a panel.
    #[test]
    fn shared_input_products_equal_single_ones() {
        if !available() {
            return;
        }
        for &(m, k) in &[(1, 3), (61, 130), (100, 64)] {
            let x = values(m * k, 7 + m as u64);
            let ws: Vec<Vec<bf16>> = [33, 64, 5]
                .iter()
                .map(|&n| values(n * k, n as u64).into_iter().map(bf16::from_f32).collect())
                .collect();
            let jobs: Vec<(&[bf16], usize)> = ws.iter().map(|w| (&w[..], w.len() / k)).collect();
            let outs = matmul_t_bf16_many(&x, m, k, &jobs);
            for (out, &(w, n)) in outs.iter().zip(&jobs) {
                let mut one = vec![f32::NAN; m * n];
                matmul_t_bf16(&x, m, k, w, n, &mut one);
                assert_eq!(out, &one, "({m},{k},{n})");
            }
        }
        assert!(matmul_t_bf16_many(&[], 0, 4, &[(&[bf16::ZERO; 8], 2)])[0].is_empty());
    }
}
