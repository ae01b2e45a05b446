//! Grouped-query attention of cross-decoder queries over the global KV cache, written as the
//! flash-decoding split: any range of cache positions yields a partial result `(o, m, l)`
//! (unnormalised output, running max, sum of exponentials) and partials over disjoint ranges are
//! merged exactly with the log-sum-exp rule. The same split serves threads on one rank and
//! ranks holding different shards of the cache.

use std::ops::Range;

use rayon::prelude::*;

use super::kv_block::BlockRef;
use super::simd::{axpy, axpy_inline, dot_inline, exp_inline};

/// Positions per parallel task when one query attends over a long cache.
const SPLIT_TOKENS: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrossShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl CrossShape {
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// A sequence's cache as the kernels see it: blocks of `block_tokens` positions, each laid out
/// `[K rows; V rows]` (`2 × block_tokens × kv_dim`), covering positions `0..len`.
#[derive(Clone)]
pub struct KvView<'a> {
    pub blocks: Vec<BlockRef<'a>>,
    pub block_tokens: usize,
    pub kv_dim: usize,
    pub len: usize,
}

impl KvView<'_> {
    /// Bytes of one cached element (the blocks' type; 4 for a view without blocks).
    pub fn element_bytes(&self) -> usize {
        self.blocks.first().map_or(4, |b| b.element_bytes())
    }

    /// K and V rows `[tile, kv_dim]` of positions `pos..pos + tile` (within one block) as f32:
    /// the block itself for an f32 cache, else converted into the scratch buffers.
    fn tile<'s>(&'s self, pos: usize, tile: usize, k: &'s mut Vec<f32>, v: &'s mut Vec<f32>) -> (&'s [f32], &'s [f32]) {
        let (bt, kvd) = (self.block_tokens, self.kv_dim);
        let block = self.blocks[pos / bt];
        let j = pos % bt;
        assert!(j + tile <= bt, "a tile stays within its block");
        let keys = block.f32_rows(j * kvd..(j + tile) * kvd, k);
        let values = block.f32_rows((bt + j) * kvd..(bt + j + tile) * kvd, v);
        (keys, values)
    }
}

/// Attention of one query over one range of positions, not yet normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    /// `Σ_j exp(s_j − m) v_j` per head, `[heads · head_dim]`.
    pub o: Vec<f32>,
    /// Max score per head (`-inf` for an empty range).
    pub m: Vec<f32>,
    /// `Σ_j exp(s_j − m)` per head.
    pub l: Vec<f32>,
}

impl Partial {
    pub fn empty(shape: CrossShape) -> Self {
        Partial { o: vec![0.0; shape.q_dim()], m: vec![f32::NEG_INFINITY; shape.heads], l: vec![0.0; shape.heads] }
    }

    /// Floats of one packed partial, `[o | m | l]`: what ranks exchange per query row.
    pub fn packed_len(shape: CrossShape) -> usize {
        shape.q_dim() + 2 * shape.heads
    }

    /// Appends `[o | m | l]` to `out`.
    pub fn pack_into(&self, out: &mut Vec<f32>) {
        out.extend_from_slice(&self.o);
        out.extend_from_slice(&self.m);
        out.extend_from_slice(&self.l);
    }

    /// Row `row` of a buffer of packed partials (`Self::pack_into`, `Self::packed_len` each).
    pub fn unpack(buf: &[f32], row: usize, shape: CrossShape) -> Self {
        let (qd, h) = (shape.q_dim(), shape.heads);
        let p = &buf[row * Self::packed_len(shape)..(row + 1) * Self::packed_len(shape)];
        Partial { o: p[..qd].to_vec(), m: p[qd..qd + h].to_vec(), l: p[qd + h..].to_vec() }
    }

    /// Merges row `row` of every rank's packed buffer, in rank order (the same bits on every
    /// rank that merges the same buffers).
    pub fn merge_gathered(all: &[Vec<f32>], row: usize, shape: CrossShape) -> Self {
        let parts: Vec<Partial> = all.iter().map(|buf| Partial::unpack(buf, row, shape)).collect();
        merge_partials(&parts, shape)
    }
}

/// Which tile kernels to use: the fastest this CPU has, at most AVX2, or the portable ones
/// only (tests compare each with the reference on every machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernels {
    Best,
    #[cfg_attr(not(test), allow(dead_code))]
    Avx2,
    #[cfg_attr(not(test), allow(dead_code))]
    Portable,
}

/// Partial attention of the query `q [heads · head_dim]` over cache positions `range`.
pub fn cross_attention_partial(q: &[f32], shape: CrossShape, kv: &KvView, range: Range<usize>) -> Partial {
    partial_with(q, shape, kv, range, Kernels::Best)
}

pub(crate) fn partial_with(
    q: &[f32],
    shape: CrossShape,
    kv: &KvView,
    range: Range<usize>,
    kernels: Kernels,
) -> Partial {
    assert!(range.end <= kv.len, "range beyond the cache");
    assert_eq!(kv.kv_dim, shape.kv_dim());
    let hd = shape.head_dim;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut part = Partial::empty(shape);
    let mut scores = vec![0f32; shape.group() * kv.block_tokens];
    let (mut k_scratch, mut v_scratch) = (Vec::new(), Vec::new());
    let kvd = kv.kv_dim;
    let group = shape.group();
    #[cfg(target_arch = "x86_64")]
    let simd: Option<SimdKernel> = if kernels == Kernels::Best && super::attend_avx512::available(group, hd) {
        Some(super::attend_avx512::attend)
    } else if kernels != Kernels::Portable && super::attend_avx2::available(group, hd) {
        Some(super::attend_avx2::attend)
    } else {
        None
    };
    let mut pos = range.start;
    while pos < range.end {
        // One tile: the rest of the current block, or of the range.
        let tile = (kv.block_tokens - pos % kv.block_tokens).min(range.end - pos);
        #[cfg(target_arch = "x86_64")]
        if let Some(attend) = simd {
            // The SIMD kernels read the block in its own element type: no widened copy.
            let (bt, j) = (kv.block_tokens, pos % kv.block_tokens);
            let (k_rows, v_rows) = (j * kvd..(j + tile) * kvd, (bt + j) * kvd..(bt + j + tile) * kvd);
            for g in 0..shape.kv_heads {
                let col = g * hd;
                let rows = match kv.blocks[pos / bt] {
                    BlockRef::F32(b) => {
                        Rows::F32(TileRows { keys: &b[k_rows.clone()], values: &b[v_rows.clone()], stride: kvd, col })
                    }
                    BlockRef::Bf16(b) => {
                        Rows::Bf16(TileRows { keys: &b[k_rows.clone()], values: &b[v_rows.clone()], stride: kvd, col })
                    }
                    BlockRef::F16(b) => {
                        Rows::F16(TileRows { keys: &b[k_rows.clone()], values: &b[v_rows.clone()], stride: kvd, col })
                    }
                };
                let heads = g * group..(g + 1) * group;
                let (qh, oh) = (&q[heads.start * hd..heads.end * hd], &mut part.o[heads.start * hd..heads.end * hd]);
                let (m, l) = (&mut part.m[heads.clone()], &mut part.l[heads]);
                attend(group, qh, rows, scale, &mut scores[..group * tile], m, l, oh);
            }
            pos += tile;
            continue;
        }
        let (keys, values) = kv.tile(pos, tile, &mut k_scratch, &mut v_scratch);
        if let Some(kernel) = group_kernel(group, hd) {
            // The heads of one KV head together: each K and V row is read once for all of them.
            for g in 0..shape.kv_heads {
                let rows = TileRows { keys, values, stride: kvd, col: g * hd };
                let heads = g * group..(g + 1) * group;
                let (qh, oh) = (&q[heads.start * hd..heads.end * hd], &mut part.o[heads.start * hd..heads.end * hd]);
                let (m, l) = (&mut part.m[heads.clone()], &mut part.l[heads]);
                kernel(qh, &rows, scale, &mut scores[..group * tile], m, l, oh);
            }
        } else {
            for h in 0..shape.heads {
                let col = h / group * hd;
                let rows = TileRows { keys, values, stride: kvd, col };
                let mut ml = (part.m[h], part.l[h]);
                let oh = &mut part.o[h * hd..(h + 1) * hd];
                attend_tile(&q[h * hd..(h + 1) * hd], &rows, scale, &mut scores[..tile], &mut ml, oh);
                (part.m[h], part.l[h]) = ml;
            }
        }
        pos += tile;
    }
    part
}

/// One head's K and V rows in a tile: row j's are `keys[j·stride + col..][..head_dim]` (and
/// the same in `values`).
pub(super) struct TileRows<'a, W = f32> {
    pub keys: &'a [W],
    pub values: &'a [W],
    pub stride: usize,
    pub col: usize,
}

/// A tile's rows in the cache's element type.
#[cfg(target_arch = "x86_64")]
pub(super) enum Rows<'a> {
    F32(TileRows<'a, f32>),
    Bf16(TileRows<'a, half::bf16>),
    F16(TileRows<'a, half::f16>),
}

multiversion! {
    /// One head over one tile of `scores.len()` positions: its scores against the key rows,
    /// then the running `(o, (m, l))` rescaled to the new max and the tile's exponentials and
    /// value rows added. One call per head and tile, with the dot products, exponentials and
    /// row updates inlined, so that the loops vectorise and a long cache costs no call per
    /// position.
    fn attend_tile(qh: &[f32], rows: &TileRows<'_>, scale: f32, scores: &mut [f32], ml: &mut (f32, f32), oh: &mut [f32]) {
        let TileRows { keys, values, stride, col } = *rows;
        let (m, l) = (&mut ml.0, &mut ml.1);
        let hd = qh.len();
        let mut tile_max = f32::NEG_INFINITY;
        for (j, s) in scores.iter_mut().enumerate() {
            *s = dot_inline(qh, &keys[j * stride + col..j * stride + col + hd]) * scale;
            tile_max = tile_max.max(*s);
        }
        let m_new = m.max(tile_max);
        let rescale = exp_inline(*m - m_new);
        if rescale != 1.0 {
            for o in oh.iter_mut() {
                *o *= rescale;
            }
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = exp_inline(*s - m_new);
            sum += *s;
        }
        for (j, &p) in scores.iter().enumerate() {
            axpy_inline(p, &values[j * stride + col..j * stride + col + hd], oh);
        }
        *m = m_new;
        *l = *l * rescale + sum;
    }
}

/// The SIMD group kernels' signature (`attend_avx2::attend`, `attend_avx512::attend`).
#[cfg(target_arch = "x86_64")]
type SimdKernel = fn(usize, &[f32], Rows<'_>, f32, &mut [f32], &mut [f32], &mut [f32], &mut [f32]);

type GroupKernel = fn(&[f32], &TileRows<'_>, f32, &mut [f32], &mut [f32], &mut [f32], &mut [f32]);

/// The kernel for `group` query heads per KV head of dimension `head_dim`, where one is
/// specialised (head_dim a multiple of 8; 1, 2, 4 or 8 heads per group).
fn group_kernel(group: usize, head_dim: usize) -> Option<GroupKernel> {
    if !head_dim.is_multiple_of(8) {
        return None;
    }
    Some(match group {
        1 => attend_group1,
        2 => attend_group2,
        4 => attend_group4,
        8 => attend_group8,
        _ => return None,
    })
}

/// [`attend_tile`] for the `G` query heads of one KV head at once (`qg`, `og`: `[G, head_dim]`;
/// `m`, `l`: `[G]`; `scores`: `[G, tile]`): every K and V row is loaded once for all of them,
/// and each head's dot product is one 8-lane accumulator.
#[inline(always)]
fn attend_group<const G: usize>(
    qg: &[f32],
    rows: &TileRows<'_>,
    scale: f32,
    scores: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
    og: &mut [f32],
) {
    let TileRows { keys, values, stride, col } = *rows;
    let hd = qg.len() / G;
    let tile = scores.len() / G;
    for j in 0..tile {
        let k = &keys[j * stride + col..j * stride + col + hd];
        for g in 0..G {
            let mut a = [0f32; 8];
            for (qc, kc) in qg[g * hd..(g + 1) * hd].chunks_exact(8).zip(k.chunks_exact(8)) {
                for i in 0..8 {
                    a[i] += qc[i] * kc[i];
                }
            }
            scores[g * tile + j] = (((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))) * scale;
        }
    }
    for g in 0..G {
        let sg = &mut scores[g * tile..(g + 1) * tile];
        let m_new = sg.iter().fold(m[g], |a, &b| a.max(b));
        let rescale = exp_inline(m[g] - m_new);
        if rescale != 1.0 {
            for o in og[g * hd..(g + 1) * hd].iter_mut() {
                *o *= rescale;
            }
        }
        let mut sum = 0f32;
        for s in sg.iter_mut() {
            *s = exp_inline(*s - m_new);
            sum += *s;
        }
        m[g] = m_new;
        l[g] = l[g] * rescale + sum;
    }
    for j in 0..tile {
        let v = &values[j * stride + col..j * stride + col + hd];
        for g in 0..G {
            axpy_inline(scores[g * tile + j], v, &mut og[g * hd..(g + 1) * hd]);
        }
    }
}

/// `attend_group::<G>` compiled for each CPU level, one function per specialised group size.
macro_rules! group_kernels {
    ($($name:ident = $g:literal),*) => {$(
        multiversion! {
            fn $name(qg: &[f32], rows: &TileRows<'_>, scale: f32, scores: &mut [f32], m: &mut [f32], l: &mut [f32], og: &mut [f32]) {
                attend_group::<$g>(qg, rows, scale, scores, m, l, og)
            }
        }
    )*};
}

group_kernels!(attend_group1 = 1, attend_group2 = 2, attend_group4 = 4, attend_group8 = 8);

/// Combines partials over disjoint ranges into one partial over their union (exact: each is
/// rescaled to the common running max).
pub fn merge_partials<'a>(parts: impl IntoIterator<Item = &'a Partial>, shape: CrossShape) -> Partial {
    let hd = shape.head_dim;
    let parts: Vec<&Partial> = parts.into_iter().collect();
    let mut out = Partial::empty(shape);
    for h in 0..shape.heads {
        let m = parts.iter().map(|p| p.m[h]).fold(f32::NEG_INFINITY, f32::max);
        if m == f32::NEG_INFINITY {
            continue; // no keys in any part
        }
        let oh = &mut out.o[h * hd..(h + 1) * hd];
        for p in &parts {
            let w = (p.m[h] - m).exp();
            if w == 0.0 {
                continue;
            }
            out.l[h] += p.l[h] * w;
            axpy(w, &p.o[h * hd..(h + 1) * hd], oh);
        }
        out.m[h] = m;
    }
    out
}

/// The attention output of a partial: `o / l` per head (zero where there were no keys).
pub fn finalize(part: &Partial, shape: CrossShape, out: &mut [f32]) {
    let hd = shape.head_dim;
    for h in 0..shape.heads {
        let oh = &mut out[h * hd..(h + 1) * hd];
        if part.l[h] > 0.0 {
            let inv = 1.0 / part.l[h];
            for (o, &v) in oh.iter_mut().zip(&part.o[h * hd..(h + 1) * hd]) {
                *o = v * inv;
            }
        } else {
            oh.fill(0.0);
        }
    }
}

/// Merges partials over disjoint ranges into the normalised attention output `[heads · head_dim]`.
pub fn lse_merge(parts: &[Partial], shape: CrossShape, out: &mut [f32]) {
    finalize(&merge_partials(parts, shape), shape, out);
}

/// Per query row r, the partial attention over the first `visible[r]` positions of `views[r]`,
/// long ranges split across threads and merged back.
pub fn cross_attention_partials(q: &[f32], visible: &[usize], views: &[&KvView], shape: CrossShape) -> Vec<Partial> {
    let qd = shape.q_dim();
    assert_eq!(q.len(), visible.len() * qd);
    assert_eq!(views.len(), visible.len());
    let tasks: Vec<(usize, Range<usize>)> = visible
        .iter()
        .enumerate()
        .flat_map(|(r, &end)| (0..end).step_by(SPLIT_TOKENS).map(move |a| (r, a..(a + SPLIT_TOKENS).min(end))))
        .collect();
    let partials: Vec<Partial> = tasks
        .par_iter()
        .map(|(r, range)| cross_attention_partial(&q[r * qd..(r + 1) * qd], shape, views[*r], range.clone()))
        .collect();
    let mut start = 0;
    (0..visible.len())
        .map(|r| {
            let count = tasks[start..].iter().take_while(|(row, _)| *row == r).count();
            let merged = merge_partials(&partials[start..start + count], shape);
            start += count;
            merged
        })
        .collect()
}

/// Causal cross-attention for several query rows: row r (at position `positions[r]`) attends over
/// positions `0..=positions[r]` of `views[r]`.
pub fn cross_attention(q: &[f32], positions: &[usize], views: &[&KvView], shape: CrossShape, out: &mut [f32]) {
    let visible: Vec<usize> = positions.iter().map(|p| p + 1).collect();
    let parts = cross_attention_partials(q, &visible, views, shape);
    for (part, out_row) in parts.iter().zip(out.chunks_exact_mut(shape.q_dim())) {
        finalize(part, shape, out_row);
    }
}

/// Plain softmax attention in f64 over explicit K/V rows `[n, kv_dim]`: the reference.
pub fn cross_attention_reference(q: &[f32], keys: &[f32], values: &[f32], shape: CrossShape) -> Vec<f32> {
    let (hd, kvd) = (shape.head_dim, shape.kv_dim());
    let n = keys.len() / kvd;
    let mut out = vec![0f32; shape.q_dim()];
    for h in 0..shape.heads {
        let g = h / shape.group();
        let scores: Vec<f64> = (0..n)
            .map(|j| {
                (0..hd).map(|c| q[h * hd + c] as f64 * keys[j * kvd + g * hd + c] as f64).sum::<f64>()
                    / (hd as f64).sqrt()
            })
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
        for c in 0..hd {
            let o: f64 = (0..n).map(|j| (scores[j] - m).exp() / z * values[j * kvd + g * hd + c] as f64).sum();
            out[h * hd + c] = o as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{assert_close, randn};

    /// Builds blocked storage for explicit K/V rows.
    fn blocks(keys: &[f32], values: &[f32], kvd: usize, bt: usize) -> Vec<Vec<f32>> {
        let n = keys.len() / kvd;
        (0..n.div_ceil(bt))
            .map(|b| {
                let mut blk = vec![0f32; 2 * bt * kvd];
                for j in 0..bt.min(n - b * bt) {
                    let p = b * bt + j;
                    blk[j * kvd..(j + 1) * kvd].copy_from_slice(&keys[p * kvd..(p + 1) * kvd]);
                    blk[(bt + j) * kvd..(bt + j + 1) * kvd].copy_from_slice(&values[p * kvd..(p + 1) * kvd]);
                }
                blk
            })
            .collect()
    }

    /// A view of f32 blocks from [`blocks`] holding `n` positions.
    fn f32_view(storage: &[Vec<f32>], bt: usize, kvd: usize, n: usize) -> KvView<'_> {
        KvView { blocks: storage.iter().map(|b| BlockRef::F32(b)).collect(), block_tokens: bt, kv_dim: kvd, len: n }
    }

    #[test]
    fn partials_merged_at_any_cut_match_reference() {
        // Group kernels (head_dim a multiple of 8; 1, 2, 4, 8 heads per KV head; with AVX-512
        // head_dim a multiple of 16 and 1 to 8 heads), the per-head kernel (head_dim 12; 3 heads
        // per KV head). Blocks of 16 and 40 positions: whole 16-row groups, and groups with a
        // tail.
        for shape in [
            CrossShape { heads: 4, kv_heads: 2, head_dim: 8 },
            CrossShape { heads: 2, kv_heads: 2, head_dim: 16 },
            CrossShape { heads: 8, kv_heads: 2, head_dim: 64 },
            CrossShape { heads: 8, kv_heads: 1, head_dim: 24 },
            CrossShape { heads: 6, kv_heads: 2, head_dim: 12 },
            CrossShape { heads: 3, kv_heads: 1, head_dim: 128 },
            CrossShape { heads: 14, kv_heads: 2, head_dim: 32 },
            CrossShape { heads: 16, kv_heads: 2, head_dim: 48 },
        ] {
            for bt in [16, 40] {
                partials_match_reference(shape, bt);
            }
        }
    }

    fn partials_match_reference(shape: CrossShape, bt: usize) {
        let (kvd, n) = (shape.kv_dim(), 103);
        // Large scores stress the running max.
        let q: Vec<f32> = randn(shape.q_dim(), 1).iter().map(|v| v * 6.0).collect();
        let keys = randn(n * kvd, 2);
        let values = randn(n * kvd, 3);
        let storage = blocks(&keys, &values, kvd, bt);
        let view = f32_view(&storage, bt, kvd, n);
        let want = cross_attention_reference(&q, &keys, &values, shape);
        for cuts in [vec![], vec![1], vec![16], vec![5, 50], vec![15, 16, 17, 102], vec![0, 0, 103]] {
            let mut bounds = vec![0];
            bounds.extend(cuts.iter().copied());
            bounds.push(n);
            for kernels in [Kernels::Best, Kernels::Avx2, Kernels::Portable] {
                let parts: Vec<Partial> =
                    bounds.windows(2).map(|w| partial_with(&q, shape, &view, w[0]..w[1].max(w[0]), kernels)).collect();
                let mut out = vec![0.0; shape.q_dim()];
                lse_merge(&parts, shape, &mut out);
                assert_close(&out, &want, 1e-5, &format!("{shape:?} blocks of {bt} cuts {cuts:?} {kernels:?}"));
            }
        }
    }

    #[test]
    fn half_precision_blocks_match_the_reference_on_their_rounded_rows() {
        for shape in
            [CrossShape { heads: 4, kv_heads: 2, head_dim: 8 }, CrossShape { heads: 8, kv_heads: 2, head_dim: 32 }]
        {
            half_blocks_match(shape);
        }
    }

    fn half_blocks_match(shape: CrossShape) {
        use crate::kernels::kv_block::{Block, CacheDtype};
        let (kvd, n, bt) = (shape.kv_dim(), 70, 40);
        let q: Vec<f32> = randn(shape.q_dim(), 11).iter().map(|v| v * 4.0).collect();
        let (keys, values) = (randn(n * kvd, 12), randn(n * kvd, 13));
        for dtype in [CacheDtype::Bf16, CacheDtype::F16] {
            let storage: Vec<Block> = blocks(&keys, &values, kvd, bt)
                .iter()
                .map(|b| {
                    let mut blk = Block::zeros(dtype, b.len());
                    blk.write(0, b);
                    blk
                })
                .collect();
            let view =
                KvView { blocks: storage.iter().map(Block::as_ref).collect(), block_tokens: bt, kv_dim: kvd, len: n };
            // The rows as stored, back in f32: what the kernel must attend over exactly.
            let blocks = &view.blocks;
            let stored = |v_rows: bool| -> Vec<f32> {
                (0..n)
                    .flat_map(|p| {
                        let base = (p % bt + if v_rows { bt } else { 0 }) * kvd;
                        (0..kvd).map(move |c| blocks[p / bt].get(base + c))
                    })
                    .collect()
            };
            let (rk, rv) = (stored(false), stored(true));
            assert_ne!(rk, keys, "{dtype} rounds");
            for kernels in [Kernels::Best, Kernels::Avx2, Kernels::Portable] {
                let mut out = vec![0.0; shape.q_dim()];
                lse_merge(&[partial_with(&q, shape, &view, 0..n, kernels)], shape, &mut out);
                let want = cross_attention_reference(&q, &rk, &rv, shape);
                assert_close(&out, &want, 1e-5, &format!("{shape:?} {dtype} {kernels:?}"));
            }
        }
    }

    #[test]
    fn causal_rows_and_long_split() {
        let shape = CrossShape { heads: 2, kv_heads: 1, head_dim: 4 };
        let (kvd, n, bt) = (shape.kv_dim(), 2 * SPLIT_TOKENS + 77, 256);
        let keys = randn(n * kvd, 5);
        let values = randn(n * kvd, 6);
        let storage = blocks(&keys, &values, kvd, bt);
        let view = f32_view(&storage, bt, kvd, n);
        let positions = [0usize, 5, n - 1];
        let q = randn(positions.len() * shape.q_dim(), 7);
        let mut out = vec![0.0; q.len()];
        cross_attention(&q, &positions, &[&view, &view, &view], shape, &mut out);
        for (r, &p) in positions.iter().enumerate() {
            let want = cross_attention_reference(
                &q[r * 8..(r + 1) * 8],
                &keys[..(p + 1) * kvd],
                &values[..(p + 1) * kvd],
                shape,
            );
            assert_close(&out[r * 8..(r + 1) * 8], &want, 1e-4, &format!("row {r}"));
        }
    }

    #[test]
    fn packed_partials_of_ranks_merge_to_the_whole_attention() {
        // Three "ranks" hold positions 0..40, 40..40 (none) and 40..n; each packs its partial
        // of two query rows, and merging row r across the packed buffers is row r's attention.
        let shape = CrossShape { heads: 4, kv_heads: 2, head_dim: 8 };
        let (kvd, n, bt) = (shape.kv_dim(), 97, 16);
        let keys = randn(n * kvd, 8);
        let values = randn(n * kvd, 9);
        let storage = blocks(&keys, &values, kvd, bt);
        let view = f32_view(&storage, bt, kvd, n);
        let q = randn(2 * shape.q_dim(), 10);
        let all: Vec<Vec<f32>> = [0..40, 40..40, 40..n]
            .into_iter()
            .map(|range| {
                let mut packed = Vec::new();
                for row in q.chunks_exact(shape.q_dim()) {
                    let part = if range.is_empty() {
                        Partial::empty(shape)
                    } else {
                        cross_attention_partial(row, shape, &view, range.clone())
                    };
                    part.pack_into(&mut packed);
                }
                assert_eq!(packed.len(), 2 * Partial::packed_len(shape));
                packed
            })
            .collect();
        for (r, row) in q.chunks_exact(shape.q_dim()).enumerate() {
            let mut out = vec![0.0; shape.q_dim()];
            finalize(&Partial::merge_gathered(&all, r, shape), shape, &mut out);
            let want = cross_attention_reference(row, &keys, &values, shape);
            assert_close(&out, &want, 1e-4, &format!("row {r}"));
        }
    }
}
