//! The cross-attention group kernel (`cross_attention::attend_group`: the `G` query heads of one
//! KV head over one tile of cache rows) in AVX-512F intrinsics, for head dimensions that are a
//! multiple of 16 and 1 to 8 heads per KV head.
//!
//! Beside the AVX2 kernel it changes three things that the profile of a 32-sequence decode step
//! pointed at (that kernel ran at about half the memory bandwidth, bound by instructions):
//! - scores: sixteen rows' dot products are reduced together by one transposing sum
//!   (`simd::hsum16x16`, 45 operations for 16 scores instead of a horizontal sum each);
//! - the exponentials are sixteen lanes wide (the scalar polynomial, bit for bit);
//! - the value sum holds up to 16 registers of output (`G × CH`), so for 4 heads of 64 each V
//!   row is loaded once for all of them.

use std::arch::x86_64::*;

use super::cross_attention::{Rows, TileRows};
use super::simd::{exp_inline, hsum16x16};
use super::widen::Widen;

/// Whether [`attend`] serves `group` heads per KV head of `head_dim`: the CPU has AVX-512F,
/// head_dim is a non-zero multiple of 16, and 1 to 8 heads share a KV head.
pub(super) fn available(group: usize, head_dim: usize) -> bool {
    head_dim.is_multiple_of(16)
        && head_dim > 0
        && (1..=8).contains(&group)
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("f16c")
}

/// The `group` query heads of one KV head over one tile of rows in the cache's own element
/// type (see `cross_attention::attend_group` for the arguments).
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
    assert!(available(group, qg.len() / group.max(1)), "the AVX-512 cross-attention kernel is not available");
    // CH: 16-lane chunks of the head dimension that one pass of the value sum keeps in
    // registers, G × CH ≤ 16 accumulators.
    macro_rules! go {
        ($r:expr) => {
            // SAFETY: `available` checked the CPU's features.
            unsafe {
                match group {
                    1 => attend_group::<_, 1, 8>(qg, &$r, scale, scores, m, l, og),
                    2 => attend_group::<_, 2, 8>(qg, &$r, scale, scores, m, l, og),
                    3 => attend_group::<_, 3, 4>(qg, &$r, scale, scores, m, l, og),
                    4 => attend_group::<_, 4, 4>(qg, &$r, scale, scores, m, l, og),
                    5 => attend_group::<_, 5, 2>(qg, &$r, scale, scores, m, l, og),
                    6 => attend_group::<_, 6, 2>(qg, &$r, scale, scores, m, l, og),
                    7 => attend_group::<_, 7, 2>(qg, &$r, scale, scores, m, l, og),
                    _ => attend_group::<_, 8, 2>(qg, &$r, scale, scores, m, l, og),
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

/// How many rows ahead of the score loop key rows are prefetched.
const K_AHEAD: usize = 32;

/// [`exp_inline`] on sixteen lanes, with the same operations in the same order (no fused
/// multiply-adds), so every lane equals the scalar result exactly.
///
/// # Safety
/// The CPU must have AVX-512F.
#[inline(always)]
pub(super) unsafe fn exp16(x: __m512) -> __m512 {
    let set = _mm512_set1_ps;
    let underflow = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, set(-87.33));
    let x = _mm512_min_ps(_mm512_max_ps(x, set(-87.33)), set(88.72));
    let t = _mm512_add_ps(_mm512_mul_ps(x, set(std::f32::consts::LOG2_E)), set(0.5));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(t);
    let r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, set(0.693_359_4))), _mm512_mul_ps(n, set(-2.121_944_4e-4)));
    let mut p = set(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = _mm512_add_ps(_mm512_mul_ps(p, r), set(c));
    }
    let er = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), set(1.0));
    let n = _mm512_cvtps_epi32(n);
    let a = _mm512_srai_epi32::<1>(n);
    // A function, not a closure: see `simd::hsum16x16`.
    #[inline(always)]
    unsafe fn pow2(e: __m512i) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(e, _mm512_set1_epi32(127))))
    }
    let y = _mm512_mul_ps(_mm512_mul_ps(er, pow2(a)), pow2(_mm512_sub_epi32(n, a)));
    _mm512_maskz_mov_ps(!underflow, y)
}

/// `G` heads over one tile (see `cross_attention::attend_group` for the arguments).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
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
    let chunks = hd / 16;
    assert!(hd.is_multiple_of(16) && og.len() == G * hd && m.len() == G && l.len() == G);
    if tile == 0 {
        return;
    }
    let last = (tile - 1) * stride + col + hd;
    assert!(last <= keys.len() && last <= values.len(), "tile rows beyond the block");
    let (kp, vp, q, sp) = (keys.as_ptr().add(col), values.as_ptr().add(col), qg.as_ptr(), scores.as_mut_ptr());
    let scale_v = _mm512_set1_ps(scale);

    // Scores, sixteen rows at a time: the rows' K chunks stay in L1 for all G heads.
    let full = tile / 16 * 16;
    let mut j = 0;
    while j < full {
        // This head's key rows K_AHEAD further on: the hardware prefetcher alone leaves the
        // stream short of the memory bandwidth (about 14 against 20 GB/s over 32 sequences'
        // caches); fetching V as well, as the AVX2 kernel does, costs more than it saves here.
        if j + 16 + K_AHEAD <= tile {
            for r in 0..16 {
                let row = kp.add((j + r + K_AHEAD) * stride);
                for line in (0..hd).step_by(64 / W::BYTES) {
                    _mm_prefetch::<_MM_HINT_T0>(row.add(line).cast());
                }
            }
        }
        for g in 0..G {
            let mut acc = [_mm512_setzero_ps(); 16];
            for c in 0..chunks {
                let qv = _mm512_loadu_ps(q.add(g * hd + c * 16));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(W::load16_avx512(kp.add((j + r) * stride + c * 16)), qv, *a);
                }
            }
            _mm512_storeu_ps(sp.add(g * tile + j), _mm512_mul_ps(hsum16x16(acc), scale_v));
        }
        j += 16;
    }
    for j in full..tile {
        for g in 0..G {
            let mut acc = _mm512_setzero_ps();
            for c in 0..chunks {
                acc = _mm512_fmadd_ps(
                    W::load16_avx512(kp.add(j * stride + c * 16)),
                    _mm512_loadu_ps(q.add(g * hd + c * 16)),
                    acc,
                );
            }
            *sp.add(g * tile + j) = _mm512_reduce_add_ps(acc) * scale;
        }
    }

    // Per head: the new running max, the old sums rescaled to it, the tile's exponentials.
    for g in 0..G {
        let s = sp.add(g * tile);
        let mut maxv = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < full {
            maxv = _mm512_max_ps(maxv, _mm512_loadu_ps(s.add(i)));
            i += 16;
        }
        let mut tile_max = _mm512_reduce_max_ps(maxv);
        for i in full..tile {
            tile_max = tile_max.max(*s.add(i));
        }
        let m_new = m[g].max(tile_max);
        let rescale = exp_inline(m[g] - m_new);
        if rescale != 1.0 {
            for o in &mut og[g * hd..(g + 1) * hd] {
                *o *= rescale;
            }
        }
        let m_v = _mm512_set1_ps(m_new);
        let mut sum_v = _mm512_setzero_ps();
        let mut i = 0;
        while i < full {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s.add(i)), m_v));
            _mm512_storeu_ps(s.add(i), e);
            sum_v = _mm512_add_ps(sum_v, e);
            i += 16;
        }
        let mut sum = _mm512_reduce_add_ps(sum_v);
        for i in full..tile {
            let e = exp_inline(*s.add(i) - m_new);
            *s.add(i) = e;
            sum += e;
        }
        m[g] = m_new;
        l[g] = l[g] * rescale + sum;
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

/// Chunks `c0..c0 + CH` (16 lanes each) of every head's output: `o[g] += Σ_j p[g, j] · v[j]`,
/// held in registers across the tile's rows.
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
    let mut acc = [[_mm512_setzero_ps(); CH]; G];
    for (g, a) in acc.iter_mut().enumerate() {
        for (ch, v) in a.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(op.add(g * hd + (c0 + ch) * 16));
        }
    }
    for j in 0..tile {
        // A loop, not `array::from_fn`: see `simd::hsum16x16`.
        let mut v = [_mm512_setzero_ps(); CH];
        for ch in 0..CH {
            v[ch] = W::load16_avx512(vp.add(j * stride + (c0 + ch) * 16));
        }
        for (g, a) in acc.iter_mut().enumerate() {
            let p = _mm512_set1_ps(*sp.add(g * tile + j));
            for ch in 0..CH {
                a[ch] = _mm512_fmadd_ps(p, v[ch], a[ch]);
            }
        }
    }
    for (g, a) in acc.iter().enumerate() {
        for (ch, v) in a.iter().enumerate() {
            _mm512_storeu_ps(op.add(g * hd + (c0 + ch) * 16), *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avx512() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    #[test]
    fn sixteen_lane_exp_equals_the_scalar_one_bit_for_bit() {
        if !avx512() {
            return;
        }
        let mut xs: Vec<f32> = (0..40_000).map(|i| -100.0 + i as f32 * 0.0047).collect();
        xs.extend([f32::NEG_INFINITY, -87.34, -87.33, 0.0, -0.0, 88.72, 1000.0, 1e-9, -1e-9]);
        xs.resize(xs.len().next_multiple_of(16), 0.5);
        for c in xs.chunks_exact(16) {
            let mut got = [0f32; 16];
            // SAFETY: AVX-512F is present; `c` and `got` hold sixteen floats.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp16(_mm512_loadu_ps(c.as_ptr()))) };
            for (g, &x) in got.iter().zip(c) {
                assert_eq!(g.to_bits(), exp_inline(x).to_bits(), "exp({x})");
            }
        }
    }
}
