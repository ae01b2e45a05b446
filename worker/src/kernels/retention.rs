//! Gated retention, in three forms that must agree to rounding:
//! - parallel (reference): `o_t = Σ_{s≤t} (q_t·k_s/√d) · exp(G_t − G_s) · v_s`, `G_t = Σ_{u≤t} γ_u`;
//! - recurrent (decode): `S_t = exp(γ_t)·S_{t−1} + (k_t/√d)ᵀ v_t`, `o_t = q_t S_t`;
//! - chunkwise (prefill): the parallel form inside blocks, the state `S` carried across them.
//!
//! Layouts: q, k, v and the output are `[T, H·d]` (token-major, heads side by side), `gamma` is
//! `[T, H]` (the per-head log-decay `logsigmoid(gt)/16`), the state is `[H, d, d]` (key × value).

use rayon::prelude::*;

use super::simd::{axpy, exp_inline, scale_in_place};

/// Tokens per block of the chunkwise form: large enough to amortise the state update, small
/// enough that in-block cumulative decays stay accurate.
pub const RETENTION_BLOCK: usize = 64;

/// Shapes shared by the retention kernels.
#[derive(Debug, Clone, Copy)]
pub struct RetentionShape {
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl RetentionShape {
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// Chunkwise retention over `shape.tokens` new tokens, starting from `state` and leaving the state
/// after the last token in it. Writes `[T, H·d]` outputs to `out`.
///
/// Heads run in parallel, each copying a block's rows of its columns of q, k and v at a time
/// into buffers that stay in L1, and writing an output of its own, which is then written into
/// `out` in parallel over token rows. (Copying each head's whole columns first took a
/// twentieth of a bf16 prefill; reading them in place in the block's products, rows 2 KiB
/// apart that share a few L1 sets, took more.)
#[allow(clippy::too_many_arguments)]
pub fn retention_chunkwise(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    gamma: &[f32],
    shape: RetentionShape,
    block: usize,
    state: &mut [f32],
    out: &mut [f32],
) {
    let (t_len, h_n, d) = (shape.tokens, shape.heads, shape.head_dim);
    assert!(q.len() == t_len * h_n * d && k.len() == q.len() && v.len() == q.len() && out.len() == q.len());
    assert_eq!(gamma.len(), t_len * h_n);
    assert_eq!(state.len(), h_n * d * d);
    let w = shape.width();
    let per_head: Vec<Vec<f32>> = state
        .par_chunks_mut(d * d)
        .enumerate()
        .map(|(h, s)| {
            let g: Vec<f32> = (0..t_len).map(|t| gamma[t * h_n + h]).collect();
            let mut o = vec![0.0f32; t_len * d];
            let mut rows = [Vec::new(), Vec::new(), Vec::new()];
            for b0 in (0..t_len).step_by(block.max(1)) {
                let b1 = (b0 + block.max(1)).min(t_len);
                for (dst, src) in rows.iter_mut().zip([q, k, v]) {
                    dst.clear();
                    for t in b0..b1 {
                        dst.extend_from_slice(&src[t * w + h * d..t * w + (h + 1) * d]);
                    }
                }
                let head = HeadView { q: &rows[0], k: &rows[1], v: &rows[2], stride: d };
                retention_block(head, &g[b0..b1], 0..b1 - b0, d, shape.scale(), s, &mut o[b0 * d..b1 * d]);
            }
            o
        })
        .collect();
    let rows_per_task = (16384 / w.max(1)).max(1);
    out.par_chunks_mut(rows_per_task * w).enumerate().for_each(|(task, dst)| {
        let t0 = task * rows_per_task;
        for (i, row) in dst.chunks_exact_mut(w).enumerate() {
            let t = t0 + i;
            for (h, o) in per_head.iter().enumerate() {
                row[h * d..(h + 1) * d].copy_from_slice(&o[t * d..(t + 1) * d]);
            }
        }
    });
}

/// One head's columns of `[T, H·d]` q, k and v: token t's are `x[t·stride..t·stride + d]`.
#[derive(Clone, Copy)]
struct HeadView<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    stride: usize,
}

/// `out[i, j] (+)= Σ_p a(i, p) · b[p, j]` for `i < m`, `j < n`, `p < kk`, with `a(i, p) =
/// a[i·ars + p·acs]` (so either operand order of a stored matrix) and `b[p, j] = b[p·ldb + j]`
/// (rows of a wider matrix): the small products of a retention block. Tiles of 4 rows × 64
/// columns stay in registers, each `a` element broadcast against a row of `b`; the edges take
/// the plain loop. Products are fused multiply-adds: one instruction in the AVX2 and AVX-512
/// builds of [`retention_block`] (a CPU without FMA would take libm's software `fmaf`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block_product(
    m: usize,
    kk: usize,
    n: usize,
    a: &[f32],
    (ars, acs): (usize, usize),
    (b, ldb): (&[f32], usize),
    out: &mut [f32],
    accumulate: bool,
) {
    const R: usize = 4;
    const N: usize = 64;
    assert!(out.len() >= m * n && ldb >= n && (kk == 0 || b.len() >= (kk - 1) * ldb + n));
    assert!(m == 0 || kk == 0 || (m - 1) * ars + (kk - 1) * acs < a.len());
    let put = |o: &mut f32, v: f32| *o = if accumulate { *o + v } else { v };
    let (full_m, full_n) = (m / R * R, n / N * N);
    for i in (0..full_m).step_by(R) {
        for j in (0..full_n).step_by(N) {
            let mut acc = [[0f32; N]; R];
            for p in 0..kk {
                let row: &[f32; N] = b[p * ldb + j..p * ldb + j + N].try_into().unwrap();
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = a[(i + r) * ars + p * acs];
                    for c in 0..N {
                        // Fused: the separate multiply and add ran at half the FMA rate.
                        acc[c] = x.mul_add(row[c], acc[c]);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (o, &v) in out[(i + r) * n + j..(i + r) * n + j + N].iter_mut().zip(acc) {
                    put(o, v);
                }
            }
        }
    }
    // The edges: rows past the last full tile of rows, columns past the last full tile.
    for i in 0..m {
        let cols = if i < full_m { full_n..n } else { 0..n };
        if cols.is_empty() {
            continue;
        }
        let mut acc = vec![0f32; cols.len()];
        for p in 0..kk {
            let x = a[i * ars + p * acs];
            for (acc, &y) in acc.iter_mut().zip(&b[p * ldb + cols.start..p * ldb + cols.end]) {
                *acc += x * y;
            }
        }
        for (o, &v) in out[i * n + cols.start..i * n + cols.end].iter_mut().zip(&acc) {
            put(o, v);
        }
    }
}

multiversion! {
    /// One block of one head: outputs of tokens `range` from the incoming state `s`, then `s`
    /// advanced past the block, as four small matrix products ([`block_product`]), compiled
    /// whole for each SIMD level with the decays' exponentials vectorised ([`exp_inline`]).
    /// Written as a dot product or axpy call per 64-element row (and libm per pair), this took
    /// a sixth of a prefill.
    #[allow(clippy::too_many_arguments)]
    fn retention_block(
        head: HeadView<'_>,
        gamma: &[f32],
        range: std::ops::Range<usize>,
        d: usize,
        scale: f32,
        s: &mut [f32],
        o: &mut [f32],
    ) {
        let (b0, len, ld) = (range.start, range.len(), head.stride);
        if len == 0 {
            return;
        }
        let mut gcum = Vec::with_capacity(len);
        let mut acc = 0f32;
        for &g in &gamma[range.clone()] {
            acc += g;
            gcum.push(acc);
        }
        // This block's rows of the head: token b0 + u at `x[u·ld..u·ld + d]`.
        let (qb, kb, vb) = (&head.q[b0 * ld..], &head.k[b0 * ld..], &head.v[b0 * ld..]);
        let ob = &mut o[b0 * d..(b0 + len) * d];
        // The incoming state, decayed to each token: exp(G_t) · q_t S.
        block_product(len, d, d, qb, (ld, 1), (s, d), ob, false);
        for (ot, &g) in ob.chunks_exact_mut(d).zip(&gcum) {
            let decay = exp_inline(g);
            for x in ot.iter_mut() {
                *x *= decay;
            }
        }
        // In-block terms: W = (Q Kᵀ)/√d ⊙ exp(G_t − G_u) for u ≤ t (0 above the diagonal),
        // then O += W V.
        let mut kt = vec![0f32; d * len];
        for u in 0..len {
            for (i, &x) in kb[u * ld..u * ld + d].iter().enumerate() {
                kt[i * len + u] = x;
            }
        }
        let mut w = vec![0f32; len * len];
        block_product(len, d, len, qb, (ld, 1), (&kt, len), &mut w, false);
        for (t, wt) in w.chunks_exact_mut(len).enumerate() {
            let gt = gcum[t];
            for (u, (x, &gu)) in wt.iter_mut().zip(&gcum).enumerate() {
                *x = if u <= t { *x * scale * exp_inline(gt - gu) } else { 0.0 };
            }
        }
        block_product(len, len, d, &w, (len, 1), (vb, ld), ob, true);
        // The state past the block: exp(G_last) S + Σ_u (scale · exp(G_last − G_u) k_u)ᵀ v_u.
        let last = gcum[len - 1];
        let decay = exp_inline(last);
        for x in s.iter_mut() {
            *x *= decay;
        }
        let mut kc = Vec::with_capacity(len * d);
        for (u, &gu) in gcum.iter().enumerate() {
            let c = scale * exp_inline(last - gu);
            kc.extend(kb[u * ld..u * ld + d].iter().map(|&x| x * c));
        }
        block_product(d, len, d, &kc, (1, d), (vb, ld), s, true);
    }
}

/// The recurrent form for one new token per head (decode): updates `state` and writes `[H·d]`.
#[allow(clippy::too_many_arguments)]
pub fn retention_recurrent_step(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    gamma: &[f32],
    heads: usize,
    head_dim: usize,
    state: &mut [f32],
    out: &mut [f32],
) {
    let d = head_dim;
    let scale = 1.0 / (d as f32).sqrt();
    for h in 0..heads {
        let s = &mut state[h * d * d..(h + 1) * d * d];
        let (qh, kh, vh) = (&q[h * d..(h + 1) * d], &k[h * d..(h + 1) * d], &v[h * d..(h + 1) * d]);
        scale_in_place(s, gamma[h].exp());
        for i in 0..d {
            axpy(kh[i] * scale, vh, &mut s[i * d..(i + 1) * d]);
        }
        let oh = &mut out[h * d..(h + 1) * d];
        oh.fill(0.0);
        for i in 0..d {
            axpy(qh[i], &s[i * d..(i + 1) * d], oh);
        }
    }
}

/// Per head, the log of the segment's total decay `Σ_t γ_t` (accumulated in f64).
pub fn retention_log_decay(gamma: &[f32], heads: usize) -> Vec<f64> {
    let mut out = vec![0f64; heads];
    for row in gamma.chunks_exact(heads) {
        for (o, &g) in out.iter_mut().zip(row) {
            *o += g as f64;
        }
    }
    out
}

/// Adds the contribution of a state that precedes the segment, `exp(G_t) · q_t S_in`, to
/// outputs computed from a zero state (`G_t` accumulated from the segment start in f64). This
/// is how a rank of a context-parallel group corrects its chunk once it knows what came before.
pub fn retention_add_incoming(q: &[f32], gamma: &[f32], shape: RetentionShape, s_in: &[f32], out: &mut [f32]) {
    let (h_n, d, w) = (shape.heads, shape.head_dim, shape.width());
    assert_eq!(s_in.len(), h_n * d * d);
    let mut g = vec![0f64; h_n];
    let mut tmp = vec![0f32; d];
    for t in 0..shape.tokens {
        for h in 0..h_n {
            g[h] += gamma[t * h_n + h] as f64;
            let decay = g[h].exp() as f32;
            if decay == 0.0 {
                continue;
            }
            let s = &s_in[h * d * d..(h + 1) * d * d];
            let qh = &q[t * w + h * d..t * w + (h + 1) * d];
            tmp.fill(0.0);
            for i in 0..d {
                axpy(qh[i], &s[i * d..(i + 1) * d], &mut tmp);
            }
            axpy(decay, &tmp, &mut out[t * w + h * d..t * w + (h + 1) * d]);
        }
    }
}

/// The parallel form in f64, O(T²): the reference for both fast forms. Starts from a zero state.
pub fn retention_parallel_reference(q: &[f32], k: &[f32], v: &[f32], gamma: &[f32], shape: RetentionShape) -> Vec<f32> {
    let (t_len, h_n, d, w) = (shape.tokens, shape.heads, shape.head_dim, shape.width());
    let mut out = vec![0.0f32; t_len * w];
    for h in 0..h_n {
        let mut g = vec![0f64; t_len];
        let mut acc = 0f64;
        for t in 0..t_len {
            acc += gamma[t * h_n + h] as f64;
            g[t] = acc;
        }
        for t in 0..t_len {
            for j in 0..d {
                let mut o = 0f64;
                for s in 0..=t {
                    let qk: f64 = (0..d).map(|i| q[t * w + h * d + i] as f64 * k[s * w + h * d + i] as f64).sum();
                    o += qk / (d as f64).sqrt() * (g[t] - g[s]).exp() * v[s * w + h * d + j] as f64;
                }
                out[t * w + h * d + j] = o as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::swiglu::log_sigmoid;
    use crate::kernels::testutil::randn;

    fn inputs(shape: RetentionShape, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let n = shape.tokens * shape.width();
        // Gates from strongly decaying to nearly 1, as trained models have.
        let gamma = randn(shape.tokens * shape.heads, seed + 3).iter().map(|g| log_sigmoid(6.0 * g) / 16.0).collect();
        (randn(n, seed), randn(n, seed + 1), randn(n, seed + 2), gamma)
    }

    fn max_err(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0.0, f32::max)
    }

    #[test]
    fn chunkwise_and_recurrent_match_parallel() {
        let shape = RetentionShape { tokens: 150, heads: 3, head_dim: 8 };
        let (q, k, v, gamma) = inputs(shape, 10);
        let want = retention_parallel_reference(&q, &k, &v, &gamma, shape);
        for block in [1, 7, 64, 150, 1000] {
            let mut state = vec![0.0; 3 * 64];
            let mut out = vec![0.0; q.len()];
            retention_chunkwise(&q, &k, &v, &gamma, shape, block, &mut state, &mut out);
            assert!(max_err(&out, &want) < 1e-4, "block {block}: {}", max_err(&out, &want));
        }
        let mut state = vec![0.0; 3 * 64];
        let mut out = vec![0.0; q.len()];
        let w = shape.width();
        for t in 0..shape.tokens {
            let r = t * w..(t + 1) * w;
            let g = &gamma[t * 3..(t + 1) * 3];
            retention_recurrent_step(&q[r.clone()], &k[r.clone()], &v[r.clone()], g, 3, 8, &mut state, &mut out[r]);
        }
        assert!(max_err(&out, &want) < 1e-4, "recurrent: {}", max_err(&out, &want));
    }

    /// Head dimensions of the presets (64, 128) and one that is not a multiple of the 64-column
    /// tile (96), over partial blocks: the register tiles and their edges.
    #[test]
    fn chunkwise_matches_parallel_at_model_head_dims() {
        for (tokens, head_dim) in [(130, 64), (70, 96), (67, 128)] {
            let shape = RetentionShape { tokens, heads: 2, head_dim };
            let (q, k, v, gamma) = inputs(shape, head_dim as u64);
            let want = retention_parallel_reference(&q, &k, &v, &gamma, shape);
            for block in [7, RETENTION_BLOCK] {
                let mut state = vec![0.0; 2 * head_dim * head_dim];
                let mut out = vec![0.0; q.len()];
                retention_chunkwise(&q, &k, &v, &gamma, shape, block, &mut state, &mut out);
                let err = max_err(&out, &want);
                assert!(err < 1e-4, "d={head_dim} block {block}: {err}");
            }
        }
    }

    #[test]
    fn zero_state_plus_incoming_correction_equals_carried_state() {
        let shape = RetentionShape { tokens: 90, heads: 2, head_dim: 8 };
        let (q, k, v, gamma) = inputs(shape, 30);
        let w = shape.width();
        let cut = 37;
        // Carried: one call over the whole sequence.
        let mut state = vec![0.0; 2 * 64];
        let mut want = vec![0.0; q.len()];
        retention_chunkwise(&q, &k, &v, &gamma, shape, 16, &mut state, &mut want);
        // Split: the second part from a zero state, then corrected with the first part's state.
        let first = RetentionShape { tokens: cut, ..shape };
        let second = RetentionShape { tokens: 90 - cut, ..shape };
        let mut s1 = vec![0.0; 2 * 64];
        let mut out = vec![0.0; q.len()];
        let (a, b) = (0..cut * w, cut * w..90 * w);
        retention_chunkwise(
            &q[a.clone()],
            &k[a.clone()],
            &v[a.clone()],
            &gamma[..cut * 2],
            first,
            16,
            &mut s1,
            &mut out[a],
        );
        let mut s2 = vec![0.0; 2 * 64];
        let g2 = &gamma[cut * 2..];
        retention_chunkwise(&q[b.clone()], &k[b.clone()], &v[b.clone()], g2, second, 16, &mut s2, &mut out[b.clone()]);
        retention_add_incoming(&q[b.clone()], g2, second, &s1, &mut out[b]);
        assert!(max_err(&out, &want) < 1e-5, "{}", max_err(&out, &want));
        // And the final state composes: S = exp(ΣG₂)·S₁ + S₂.
        let decay = retention_log_decay(g2, 2);
        for h in 0..2 {
            for i in 0..64 {
                let composed = (decay[h].exp() as f32) * s1[h * 64 + i] + s2[h * 64 + i];
                assert!((composed - state[h * 64 + i]).abs() < 1e-5 * (1.0 + state[h * 64 + i].abs()));
            }
        }
    }

    #[test]
    fn split_calls_carry_the_state_exactly() {
        let shape = RetentionShape { tokens: 100, heads: 2, head_dim: 4 };
        let (q, k, v, gamma) = inputs(shape, 20);
        let mut whole_state = vec![0.0; 2 * 16];
        let mut whole = vec![0.0; q.len()];
        retention_chunkwise(&q, &k, &v, &gamma, shape, 16, &mut whole_state, &mut whole);
        for cut in [1, 33, 64, 99] {
            let mut state = vec![0.0; 2 * 16];
            let mut out = vec![0.0; q.len()];
            let w = shape.width();
            for (a, b) in [(0, cut), (cut, 100)] {
                let part = RetentionShape { tokens: b - a, ..shape };
                retention_chunkwise(
                    &q[a * w..b * w],
                    &k[a * w..b * w],
                    &v[a * w..b * w],
                    &gamma[a * 2..b * 2],
                    part,
                    16,
                    &mut state,
                    &mut out[a * w..b * w],
                );
            }
            assert!(max_err(&out, &whole) < 1e-5, "cut {cut}");
            assert!(max_err(&state, &whole_state) < 1e-5, "cut {cut} state");
        }
    }
}
