//! The cross-attention group kernel (`cross_attention::attend_group`: the `G` query heads of one
//! KV head over one tile of cache rows) in AVX2 + FMA intrinsics. The portable kernel leaves
//! the compiler one horizontal sum per score and a scalar exponential; here eight dot products
//! (`8 / G` rows × the G heads) are reduced together into one register of scores, the
//! exponentials are eight lanes wide (the same polynomial as [`exp_inline`], bit for bit), and
//! the weighted sum of value rows keeps each head's output slice in registers for the whole
//! tile.
//!
//! Eight rows of one head, as before, loaded each K chunk G times. On the tiny preset's shape (4
//! heads of 64 on one KV head, f32 cache, AVX2-only Zen 3) that took one thread over a
//! cache-resident 8K context from 18 to 21 GB/s, and 128K decode from 44 to 50 tokens/s
//! (alternated runs; docs/benchmarks.md).

use std::arch::x86_64::*;

use super::cross_attention::{Rows, TileRows};
use super::simd::{exp_inline, hsum, hsum8x8};
use super::widen::Widen;

/// Whether [`attend`] serves `group` heads per KV head of `head_dim`: the CPU has AVX2, FMA
/// and F16C, head_dim is a multiple of 8, and 1, 2, 4 or 8 heads share a KV head.
pub(super) fn available(group: usize, head_dim: usize) -> bool {
    head_dim.is_multiple_of(8)
        && matches!(group, 1 | 2 | 4 | 8)
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// The `group` query heads of one KV head over one tile of rows in the cache's own element
/// type (see `cross_attention::attend_group` for the arguments; `scores` is scratch of G × tile
/// that this kernel lays out `[tile, G]`). `CH` is how many 8-lane
/// chunks of the head dimension one pass of the value sum keeps in registers (`G × CH`
/// accumulators).
///
/// # Panics
/// Where [`available`] is false.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend(
    group: usize,
    qg: &[f32],
    rows: Rows<'_>,
    scale: f32,
    scores: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
    og: &mut [f32],
) {
    assert!(available(group, qg.len() / group.max(1)), "the AVX2 cross-attention kernel is not available");
    macro_rules! go {
        ($r:expr) => {
            // SAFETY: `available` checked the CPU's features.
            unsafe {
                match group {
                    1 => attend_group::<_, 1, 4>(qg, &$r, scale, scores, m, l, og),
                    2 => attend_group::<_, 2, 4>(qg, &$r, scale, scores, m, l, og),
                    4 => attend_group::<_, 4, 2>(qg, &$r, scale, scores, m, l, og),
                    _ => attend_group::<_, 8, 1>(qg, &$r, scale, scores, m, l, og),
                }
            }
        };
    }
    match rows {
        Rows::F32(r) => go!(r),
        Rows::Bf16(r) => go!(r),
        Rows::F16(r) => go!(r),
    }
}

/// [`exp_inline`] on eight lanes, with the same operations in the same order (no fused
/// multiply-adds), so every lane equals the scalar result exactly.
///
/// # Safety
/// The CPU must have AVX2.
#[inline(always)]
pub(super) unsafe fn exp8(x: __m256) -> __m256 {
    let set = _mm256_set1_ps;
    let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, set(-87.33));
    let x = _mm256_min_ps(_mm256_max_ps(x, set(-87.33)), set(88.72));
    let n = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(x, set(std::f32::consts::LOG2_E)), set(0.5)));
    let r = _mm256_sub_ps(_mm256_sub_ps(x, _mm256_mul_ps(n, set(0.693_359_4))), _mm256_mul_ps(n, set(-2.121_944_4e-4)));
    let mut p = set(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = _mm256_add_ps(_mm256_mul_ps(p, r), set(c));
    }
    let er = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), set(1.0));
    let n = _mm256_cvtps_epi32(n);
    let a = _mm256_srai_epi32::<1>(n);
    let pow2 = |e: __m256i| _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(e, _mm256_set1_epi32(127))));
    let y = _mm256_mul_ps(_mm256_mul_ps(er, pow2(a)), pow2(_mm256_sub_epi32(n, a)));
    _mm256_andnot_ps(underflow, y)
}

/// `G` heads over one tile (see `cross_attention::attend_group` for the arguments).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_group<W: Widen, const G: usize, const CH: usize>(
    qg: &[f32],
    rows: &TileRows<'_, W>,
    scale: f32,
    scores: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
    og: &mut [f32],
) {
    let TileRows { keys, values, stride, col } = *rows;
    let hd = qg.len() / G;
    let tile = scores.len() / G;
    let chunks = hd / 8;
    assert!(hd.is_multiple_of(8) && og.len() == G * hd && m.len() == G && l.len() == G);
    if tile == 0 {
        return;
    }
    let last = (tile - 1) * stride + col + hd;
    assert!(last <= keys.len() && last <= values.len(), "tile rows beyond the block");
    let (kp, vp, q, sp) = (keys.as_ptr().add(col), values.as_ptr().add(col), qg.as_ptr(), scores.as_mut_ptr());
    let scale_v = _mm256_set1_ps(scale);

    // Scores, `8 / G` rows × G heads at a time: eight dot products, each an accumulator,
    // so each K chunk is loaded once for every head and one horizontal sum serves all eight.
    // `scores` is `[tile, G]` (row-major), so the eight land in one store. The same rows of V
    // are fetched meanwhile: the value sum below reads them a chunk column at a time, an
    // access pattern the hardware prefetcher would otherwise meet in DRAM. Each score is the
    // same chain of FMAs and the same reduction tree as one row at a time: the same bits.
    let step = 8 / G;
    let full = tile / step * step;
    let mut j = 0;
    while j < full {
        for r in 0..step {
            let row = vp.add((j + r) * stride);
            for line in (0..hd).step_by(64 / W::BYTES) {
                _mm_prefetch::<_MM_HINT_T0>(row.add(line).cast());
            }
        }
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in 0..chunks {
            for r in 0..step {
                let kv = W::load8_avx2(kp.add((j + r) * stride + c * 8));
                for g in 0..G {
                    acc[r * G + g] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q.add(g * hd + c * 8)), acc[r * G + g]);
                }
            }
        }
        _mm256_storeu_ps(sp.add(j * G), _mm256_mul_ps(hsum8x8(acc), scale_v));
        j += step;
    }
    for j in full..tile {
        for g in 0..G {
            let mut acc = _mm256_setzero_ps();
            for c in 0..chunks {
                acc = _mm256_fmadd_ps(
                    W::load8_avx2(kp.add(j * stride + c * 8)),
                    _mm256_loadu_ps(q.add(g * hd + c * 8)),
                    acc,
                );
            }
            *sp.add(j * G + g) = hsum(acc) * scale;
        }
    }

    // The new running max of each head, the old sums rescaled to it, the tile's exponentials.
    // In `[tile, G]` order lane i of every 8-wide load belongs to head i mod G.
    let n = tile * G;
    let whole = n / 8 * 8;
    let mut maxv = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < whole {
        maxv = _mm256_max_ps(maxv, _mm256_loadu_ps(sp.add(i)));
        i += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), maxv);
    let mut m_new = [f32::NEG_INFINITY; G];
    for (i, &x) in lanes.iter().enumerate() {
        m_new[i % G] = m_new[i % G].max(x);
    }
    for i in whole..n {
        m_new[i % G] = m_new[i % G].max(*sp.add(i));
    }
    let mut rescale = [1f32; G];
    for g in 0..G {
        m_new[g] = m[g].max(m_new[g]);
        rescale[g] = exp_inline(m[g] - m_new[g]);
        if rescale[g] != 1.0 {
            for o in &mut og[g * hd..(g + 1) * hd] {
                *o *= rescale[g];
            }
        }
    }
    let m_v = _mm256_loadu_ps(std::array::from_fn::<f32, 8, _>(|i| m_new[i % G]).as_ptr());
    let mut sum_v = _mm256_setzero_ps();
    let mut i = 0;
    while i < whole {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sp.add(i)), m_v));
        _mm256_storeu_ps(sp.add(i), e);
        sum_v = _mm256_add_ps(sum_v, e);
        i += 8;
    }
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum_v);
    let mut sum = [0f32; G];
    for (i, &x) in lanes.iter().enumerate() {
        sum[i % G] += x;
    }
    for i in whole..n {
        let e = exp_inline(*sp.add(i) - m_new[i % G]);
        *sp.add(i) = e;
        sum[i % G] += e;
    }
    for g in 0..G {
        m[g] = m_new[g];
        l[g] = l[g] * rescale[g] + sum[g];
    }

    // o += Σ_j p_j v_j, CH chunks of the head dimension at a time (then one at a time).
    let op = og.as_mut_ptr();
    let mut c = 0;
    while c + CH <= chunks {
        value_sum::<W, G, CH>(c, vp, stride, sp, tile, op, hd);
        c += CH;
    }
    while c < chunks {
        value_sum::<W, G, 1>(c, vp, stride, sp, tile, op, hd);
        c += 1;
    }
}

/// Chunks `c0..c0 + CH` of every head's output: `o[g] += Σ_j p[g, j] · v[j]`, held in
/// registers across the tile's rows.
#[inline(always)]
unsafe fn value_sum<W: Widen, const G: usize, const CH: usize>(
    c0: usize,
    vp: *const W,
    stride: usize,
    sp: *const f32,
    tile: usize,
    op: *mut f32,
    hd: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); CH]; G];
    for (g, a) in acc.iter_mut().enumerate() {
        for (ch, v) in a.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(op.add(g * hd + (c0 + ch) * 8));
        }
    }
    for j in 0..tile {
        let v: [__m256; CH] = std::array::from_fn(|ch| W::load8_avx2(vp.add(j * stride + (c0 + ch) * 8)));
        for (g, a) in acc.iter_mut().enumerate() {
            let p = _mm256_set1_ps(*sp.add(j * G + g));
            for ch in 0..CH {
                a[ch] = _mm256_fmadd_ps(p, v[ch], a[ch]);
            }
        }
    }
    for (g, a) in acc.iter().enumerate() {
        for (ch, v) in a.iter().enumerate() {
            _mm256_storeu_ps(op.add(g * hd + (c0 + ch) * 8), *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_lane_exp_equals_the_scalar_one_bit_for_bit() {
        if !is_x86_feature_detected!("avx2") {
            return;
        }
        let mut xs: Vec<f32> = (0..40_000).map(|i| -100.0 + i as f32 * 0.0047).collect();
        xs.extend([f32::NEG_INFINITY, -87.34, -87.33, 0.0, -0.0, 88.72, 1000.0, 1e-9]);
        xs.resize(xs.len().next_multiple_of(8), 0.5);
        for c in xs.chunks_exact(8) {
            let mut got = [0f32; 8];
            // SAFETY: AVX2 is present; `c` and `got` hold eight floats.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8(_mm256_loadu_ps(c.as_ptr()))) };
            for (g, &x) in got.iter().zip(c) {
                assert_eq!(g.to_bits(), exp_inline(x).to_bits(), "exp({x})");
            }
        }
    }
}
