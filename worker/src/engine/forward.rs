//! The YOCO forward pass, written once over any [`Backend`] and any `tp × cp` grid: the
//! self-decoder over a batch of segments (prefill chunks and decode tokens of several sequences
//! in one matrix of rows), the global cache's K/V of its outputs, and the cross-decoder over the
//! rows whose logits are wanted.
//!
//! A segment cut across the context-parallel ranks (a prompt's chunk) exchanges what its
//! neighbours need within the grid's column, exactly (the arithmetic in `crate::cp`):
//!
//! - gated retention: each rank runs its chunk from a zero state, all-gathers its chunk state and
//!   log-decay, composes the state that precedes its chunk and adds that state's contribution
//!   to its outputs (`Backend::retention_add_incoming`);
//! - sliding-window attention: each rank all-gathers the last W−1 rotated keys and values of its
//!   chunk (its halo) and attends over the halos before it;
//! - the cross-decoder: every rank runs the same rows over its shard of the cache, and the
//!   partial attentions are merged with log-sum-exp in rank order, the same bits on every rank.
//!
//! What travels is small (states, halos, partials, rows entering the cross-decoder) and goes
//! through the host; activations and caches stay where the backend keeps them. A rank whose
//! chunk is empty computes nothing but takes part in every exchange.

use std::ops::Range;

use rayon::prelude::*;

use super::caches::State;
use super::layers::{ColumnLinear, Mixer, Weights, GATE_LOGIT_NORMALIZER};
use super::EngineError;
use crate::backend::Backend;
use crate::comm::{Collective, CommError, Grid};
use crate::cp::{last_rows, retention_incoming};
use crate::kernels::cross_attention::{finalize, CrossShape, Partial};
use crate::kernels::retention::retention_log_decay;

type Result<T> = std::result::Result<T, EngineError>;

/// A run of consecutive tokens of one sequence inside a batch: rows `rows` of the batch.
#[derive(Debug, Clone)]
pub(super) struct Segment {
    pub(super) rows: Range<usize>,
    /// `Some` when the rows are this rank's chunk of tokens cut across the ranks of the column
    /// (context-parallel prefill); `None` when every rank holds the same rows (decode).
    pub(super) shard: Option<Shard>,
}

/// This rank's place in a context-parallel cut: every rank's chunk length, in rank order.
#[derive(Debug, Clone)]
pub(super) struct Shard {
    pub(super) rank: usize,
    pub(super) chunk_lens: Vec<usize>,
}

impl Segment {
    /// Whether this segment's self-decoder state must be exchanged with other ranks.
    fn distributed(&self) -> bool {
        self.shard.as_ref().is_some_and(|s| s.chunk_lens.len() > 1)
    }
}

/// Rows of a step's buffer: the buffer itself when they are all of it, else a copy of them.
pub(super) enum Rows<'a, B: Backend> {
    All(&'a B::Buf),
    Copied(B::Buf),
}

impl<B: Backend> std::ops::Deref for Rows<'_, B> {
    type Target = B::Buf;
    fn deref(&self) -> &B::Buf {
        match self {
            Rows::All(x) => x,
            Rows::Copied(x) => x,
        }
    }
}

/// Rows `rows` of `x [total, width]`, copied only when they are not all of it (a step of one
/// prompt chunk or one decode token is the common case, and copies nothing).
pub(super) fn rows_of<'a, B: Backend>(
    b: &B,
    x: &'a B::Buf,
    width: usize,
    rows: Range<usize>,
    total: usize,
) -> Result<Rows<'a, B>> {
    if rows == (0..total) {
        return Ok(Rows::All(x));
    }
    Ok(Rows::Copied(b.rows(x, width, rows)?))
}

fn protocol(peer: usize, reason: &str) -> EngineError {
    EngineError::Comm(CommError::Protocol { peer, reason: reason.into() })
}

/// Every rank's `data`, all the same length (else a protocol error).
fn gather_equal(group: &mut dyn Collective, data: &[f32], what: &str) -> Result<Vec<Vec<f32>>> {
    let all = group.all_gather(data)?;
    match all.iter().position(|p| p.len() != data.len()) {
        Some(peer) => Err(protocol(peer, &format!("{what} of different sizes across ranks"))),
        None => Ok(all),
    }
}

/// What the cross-decoder reads for one row: the cache blocks and how many of this rank's rows
/// the row sees.
pub(super) struct CrossRows<'a, B: Backend> {
    pub(super) positions: &'a [u32],
    pub(super) tables: &'a [B::BlockTable],
    pub(super) visible: &'a [usize],
}

impl<B: Backend> Weights<B> {
    /// One self-decoder layer over a batch of `n` rows: `x [n, dim]` is updated in place and
    /// each segment's state (`states[i]` for `segments[i]`) advances past its tokens.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn self_layer(
        &self,
        b: &B,
        layer: usize,
        x: &mut B::Buf,
        n: usize,
        segments: &[Segment],
        states: &mut [&mut State<B>],
        rope: Option<&B::RopeTable>,
        grid: &mut Grid,
    ) -> Result<()> {
        let l = &self.self_layers[layer];
        let (dim, eps) = (self.cfg.dim, self.cfg.norm_eps);
        let xn = if n > 0 { Some(b.rms_norm(x, n, dim, Some(&l.norm), eps)?) } else { None };
        let mixed = match &l.mixer {
            Mixer::Retention { q, k, v, g, gt, out } => {
                // Every projection of the normed rows at once (they share the input).
                let projected = match (&xn, rope) {
                    (Some(xn), Some(rope)) => {
                        let [mut qh, mut kh, vh, gt_raw, gate] =
                            ColumnLinear::forward_many(b, xn, n, [q, k, v, gt, g])?;
                        self.rotate(b, &mut qh, &mut kh, rope)?;
                        Some(([qh, kh, vh, gt_raw], gate))
                    }
                    _ => None,
                };
                let (qkvg, gate) = projected.unzip();
                let o = self.retention(b, qkvg, n, segments, states, grid)?;
                match (o, gate) {
                    (Some(o), Some(mut gate)) => {
                        // subln (RMSNorm over each head, no weight), the swish gate, out_proj.
                        let (heads, hd) = (self.self_heads(), self.cfg.self_head_dim());
                        let normed = b.rms_norm(&o, n * heads, hd, None, eps)?;
                        b.silu_mul(&mut gate, &normed, n * heads * hd)?;
                        Some(out.forward(b, &gate, n, grid)?)
                    }
                    _ => None,
                }
            }
            Mixer::Window { q, k, v, out, window } => {
                match self.window(b, xn.as_ref(), n, [q, k, v], *window, segments, states, rope, grid)? {
                    Some(o) => Some(out.forward(b, &o, n, grid)?),
                    None => None,
                }
            }
        };
        if let Some(mixed) = mixed {
            b.add_assign(x, &mixed, n * dim)?;
            let hn = b.rms_norm(x, n, dim, Some(&l.final_norm), eps)?;
            let ffn = l.ffn.forward(b, &hn, n, grid)?;
            b.add_assign(x, &ffn, n * dim)?;
        }
        Ok(())
    }

    /// A mixer's queries, keys and values of the normed rows `xn [n, dim]`, q and k rotated.
    fn project_qkv(
        &self,
        b: &B,
        xn: &B::Buf,
        n: usize,
        qkv: [&ColumnLinear<B>; 3],
        rope: &B::RopeTable,
    ) -> Result<(B::Buf, B::Buf, B::Buf)> {
        let [mut qh, mut kh, vh] = ColumnLinear::forward_many(b, xn, n, qkv)?;
        self.rotate(b, &mut qh, &mut kh, rope)?;
        Ok((qh, kh, vh))
    }

    /// RoPE on a self-decoder mixer's queries and keys.
    fn rotate(&self, b: &B, qh: &mut B::Buf, kh: &mut B::Buf, rope: &B::RopeTable) -> Result<()> {
        let (heads, hd) = (self.self_heads(), self.cfg.self_head_dim());
        b.rope(qh, rope, heads, hd)?;
        b.rope(kh, rope, heads, hd)?;
        Ok(())
    }

    /// Gated retention of every segment (the outputs before subln; `None` for no rows), from
    /// this rank's rotated queries and keys, values and gate logits (`None` for no rows).
    fn retention(
        &self,
        b: &B,
        projected: Option<[B::Buf; 4]>,
        n: usize,
        segments: &[Segment],
        states: &mut [&mut State<B>],
        grid: &mut Grid,
    ) -> Result<Option<B::Buf>> {
        let (heads, hd) = (self.self_heads(), self.cfg.self_head_dim());
        let (qd, per) = (heads * hd, heads * hd * hd);
        let distributed: Vec<usize> = (0..segments.len()).filter(|&i| segments[i].distributed()).collect();
        // A distributed segment runs its chunk from a zero state; the true incoming state is
        // added once every rank's chunk state is known.
        let mut fresh = distributed.iter().map(|_| b.zeros(per)).collect::<std::result::Result<Vec<_>, _>>()?;
        let computed = match projected {
            Some([qh, kh, vh, gt_raw]) => {
                let gamma = b.log_sigmoid_scaled(&gt_raw, n * heads, GATE_LOGIT_NORMALIZER)?;
                let ranges: Vec<Range<usize>> = segments.iter().map(|s| s.rows.clone()).collect();
                let mut fresh_iter = fresh.iter_mut();
                let mut refs: Vec<&mut B::Buf> = Vec::with_capacity(segments.len());
                for (seg, st) in segments.iter().zip(states.iter_mut()) {
                    if seg.distributed() {
                        refs.push(fresh_iter.next().expect("one fresh state per distributed segment"));
                    } else {
                        let State::Retention(s) = &mut **st else { unreachable!("a retention layer's state") };
                        refs.push(s);
                    }
                }
                let o = b.retention_batch(&qh, &kh, &vh, &gamma, &ranges, &mut refs, heads, hd)?;
                Some((qh, gamma, o))
            }
            _ => None,
        };
        if distributed.is_empty() {
            return Ok(computed.map(|(_, _, o)| o));
        }
        let gamma_host = match &computed {
            Some((_, gamma, _)) => b.download(gamma)?,
            None => Vec::new(),
        };
        let mut packed = Vec::with_capacity(distributed.len() * (per + heads));
        for (&i, state) in distributed.iter().zip(&fresh) {
            let rows = &segments[i].rows;
            if rows.is_empty() {
                packed.extend(std::iter::repeat_n(0.0, per + heads));
                continue;
            }
            packed.extend_from_slice(&b.download(state)?[..per]);
            let g = &gamma_host[rows.start * heads..rows.end * heads];
            packed.extend(retention_log_decay(g, heads).iter().map(|&d| d as f32));
        }
        let all = gather_equal(&mut grid.cp(), &packed, "retention states")?;
        let mut computed = computed;
        for (j, &i) in distributed.iter().enumerate() {
            let seg = &segments[i];
            let rank = seg.shard.as_ref().map_or(0, |s| s.rank);
            let parts: Vec<(&[f32], &[f32])> = all
                .iter()
                .map(|p| {
                    let at = j * (per + heads);
                    (&p[at..at + per], &p[at + per..at + per + heads])
                })
                .collect();
            let State::Retention(state) = &mut *states[i] else { unreachable!("a retention layer's state") };
            let before = b.download(state)?;
            let (incoming, after) = retention_incoming(&before[..per], &parts, heads, rank);
            if let Some((qh, _, o)) = computed.as_mut().filter(|_| !seg.rows.is_empty()) {
                let (m, r) = (seg.rows.len(), seg.rows.clone());
                let qs = b.rows(qh, qd, r.clone())?;
                let mut os = b.rows(o, qd, r.clone())?;
                let g = &gamma_host[r.start * heads..r.end * heads];
                b.retention_add_incoming(&qs, g, &incoming, &mut os, m, heads, hd)?;
                b.write_rows(o, qd, r.start, &os, m)?;
            }
            *state = b.upload(&after)?;
        }
        Ok(computed.map(|(_, _, o)| o))
    }

    /// Sliding-window attention of every segment (`None` for no rows).
    #[allow(clippy::too_many_arguments)]
    fn window(
        &self,
        b: &B,
        xn: Option<&B::Buf>,
        n: usize,
        [q, k, v]: [&ColumnLinear<B>; 3],
        window: usize,
        segments: &[Segment],
        states: &mut [&mut State<B>],
        rope: Option<&B::RopeTable>,
        grid: &mut Grid,
    ) -> Result<Option<B::Buf>> {
        let (heads, hd) = (self.self_heads(), self.cfg.self_head_dim());
        let (qd, halo) = (heads * hd, window - 1);
        let projected = match (xn, rope) {
            (Some(xn), Some(rope)) => Some(self.project_qkv(b, xn, n, [q, k, v], rope)?),
            _ => None,
        };
        // Each distributed segment's halo: the last W−1 rows of this rank's chunk.
        let all = if segments.iter().any(Segment::distributed) {
            let mut packed = Vec::new();
            for seg in segments.iter().filter(|s| s.distributed() && !s.rows.is_empty()) {
                let (_, kh, vh) = projected.as_ref().expect("rows were computed");
                let tail = seg.rows.end - seg.rows.len().min(halo)..seg.rows.end;
                packed.extend(b.download_owned(b.rows(kh, qd, tail.clone())?)?);
                packed.extend(b.download_owned(b.rows(vh, qd, tail)?)?);
            }
            grid.cp().all_gather(&packed)?
        } else {
            Vec::new()
        };
        let mut offsets = vec![0usize; all.len()];
        let mut o = match n {
            0 => None,
            _ => Some(b.zeros(n * qd)?),
        };
        for (seg, st) in segments.iter().zip(states.iter_mut()) {
            let State::Window { keys, values, rows } = &mut **st else { unreachable!("a window layer's state") };
            let m = seg.rows.len();
            let step = |keys: &mut B::Buf, values: &mut B::Buf, rows: &mut usize, o: &mut B::Buf| -> Result<()> {
                let (qh, kh, vh) = projected.as_ref().expect("rows were computed");
                let part = |x| rows_of(b, x, qd, seg.rows.clone(), n);
                let (qs, ks, vs) = (part(qh)?, part(kh)?, part(vh)?);
                let os = window_step(b, &qs, &ks, &vs, m, (keys, values, rows), window, heads, hd)?;
                b.write_rows(o, qd, seg.rows.start, &os, m)?;
                Ok(())
            };
            match &seg.shard {
                Some(shard) if seg.distributed() => {
                    let (mut tails_k, mut tails_v) = (Vec::new(), Vec::new());
                    for (j, (buf, off)) in all.iter().zip(offsets.iter_mut()).enumerate() {
                        let len = shard.chunk_lens[j].min(halo) * qd;
                        let (tk, tv) = match (buf.get(*off..*off + len), buf.get(*off + len..*off + 2 * len)) {
                            (Some(tk), Some(tv)) => (tk, tv),
                            _ => return Err(protocol(j, "a window halo of the wrong size")),
                        };
                        tails_k.push(tk);
                        tails_v.push(tv);
                        *off += 2 * len;
                    }
                    // The rows before this rank's chunk, and after the whole step.
                    let kept = *rows * qd;
                    let (own_k, own_v) = (b.download(keys)?, b.download(values)?);
                    let before = |own: &[f32], tails: &[&[f32]], upto: usize| {
                        let mut parts: Vec<&[f32]> = vec![&own[..kept]];
                        parts.extend(&tails[..upto]);
                        last_rows(&parts, halo, qd)
                    };
                    let world = shard.chunk_lens.len();
                    let (after_k, after_v) = (before(&own_k, &tails_k, world), before(&own_v, &tails_v, world));
                    if m > 0 {
                        let prefix_k = before(&own_k, &tails_k, shard.rank);
                        *rows = prefix_k.len() / qd;
                        *keys = b.upload(&prefix_k)?;
                        *values = b.upload(&before(&own_v, &tails_v, shard.rank))?;
                        step(keys, values, rows, o.as_mut().expect("rows were computed"))?;
                    }
                    *rows = after_k.len() / qd;
                    *keys = b.upload(&after_k)?;
                    *values = b.upload(&after_v)?;
                }
                _ if m > 0 => step(keys, values, rows, o.as_mut().expect("rows were computed"))?,
                _ => {}
            }
        }
        if offsets.iter().zip(&all).any(|(&off, buf)| off != buf.len()) {
            return Err(protocol(0, "window halos longer than the step's segments"));
        }
        Ok(o)
    }

    /// This rank's part of the global cache rows for self-decoder output rows `x [n, dim]`:
    /// `(K, V)` of its KV heads, each `[n, kv_dim]`, K rotated by `positions`.
    pub(super) fn kv_rows(&self, b: &B, x: &B::Buf, n: usize, positions: &[u32]) -> Result<(B::Buf, B::Buf)> {
        let xn = b.rms_norm(x, n, self.cfg.dim, Some(&self.kv_norm), self.cfg.norm_eps)?;
        let [mut k, v] = ColumnLinear::forward_many(b, &xn, n, [&self.k_proj, &self.v_proj])?;
        let shape = self.cross_shape();
        b.rope(&mut k, &b.rope_table(&self.rope_cross, positions)?, shape.kv_heads, shape.head_dim)?;
        Ok((k, v))
    }

    /// The cross-decoder for self-decoder output rows `x [n, dim]` (the same rows on every rank of
    /// the grid). Row r sits at `rows.positions[r]` and sees the first `rows.visible[r]` rows of
    /// this rank's cache shard; the column's partial attentions (the other positions) are
    /// merged, the row's partial sums (the other heads) all-reduced.
    ///
    /// With `groups` (see `Backend::row_groups`; the caller gives them on a lone rank only, as a
    /// group runs each layer's collectives in one order on every rank), each group of rows goes through every layer on
    /// its own, the groups in parallel: every layer after the first then finds the group's
    /// caches in the last-level cache.
    pub(super) fn cross_decode(
        &self,
        b: &B,
        x: B::Buf,
        rows: &CrossRows<'_, B>,
        pool: &B::Pool,
        groups: Option<Vec<Range<usize>>>,
        grid: &mut Grid,
    ) -> Result<B::Buf> {
        let (n, dim) = (rows.positions.len(), self.cfg.dim);
        let Some(groups) = groups else {
            return self.cross_layers(b, x, rows, pool, grid);
        };
        // Each group alone through every layer, the groups in parallel.
        let outs = groups
            .par_iter()
            .map(|g| {
                let part = CrossRows {
                    positions: &rows.positions[g.clone()],
                    tables: &rows.tables[g.clone()],
                    visible: &rows.visible[g.clone()],
                };
                self.cross_layers(b, b.rows(&x, dim, g.clone())?, &part, pool, &mut Grid::single())
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = b.zeros(n * dim)?;
        for (g, y) in groups.iter().zip(&outs) {
            b.write_rows(&mut out, dim, g.start, y, g.len())?;
        }
        Ok(out)
    }

    /// [`Self::cross_decode`], every layer over all rows.
    fn cross_layers(
        &self,
        b: &B,
        mut x: B::Buf,
        rows: &CrossRows<'_, B>,
        pool: &B::Pool,
        grid: &mut Grid,
    ) -> Result<B::Buf> {
        let (n, dim, eps) = (rows.positions.len(), self.cfg.dim, self.cfg.norm_eps);
        let shape = self.cross_shape();
        let rope = b.rope_table(&self.rope_cross, rows.positions)?;
        for l in &self.cross_layers {
            let xn = b.rms_norm(&x, n, dim, Some(&l.norm), eps)?;
            let mut q = l.q.forward(b, &xn, n)?;
            b.rope(&mut q, &rope, shape.heads, shape.head_dim)?;
            let o = if grid.cp_size() > 1 {
                attention_across_ranks(b, &mut grid.cp(), &q, pool, rows.tables, rows.visible, shape)?
            } else {
                b.cross_attention_rows(&q, pool, rows.tables, shape)?
            };
            b.add_assign(&mut x, &l.out.forward(b, &o, n, grid)?, n * dim)?;
            let hn = b.rms_norm(&x, n, dim, Some(&l.final_norm), eps)?;
            b.add_assign(&mut x, &l.ffn.forward(b, &hn, n, grid)?, n * dim)?;
        }
        Ok(x)
    }
}

/// Cross-attention of the query rows `q [rows, heads · head_dim]`, row i over the first
/// `visible[i]` rows of this rank's shard (`tables[i]`), merged with every rank's partials in
/// rank order: the attention over the whole cache, the same bits on every rank.
fn attention_across_ranks<B: Backend>(
    b: &B,
    group: &mut dyn Collective,
    q: &B::Buf,
    pool: &B::Pool,
    tables: &[B::BlockTable],
    visible: &[usize],
    shape: CrossShape,
) -> Result<B::Buf> {
    let qd = shape.q_dim();
    let mut packed = Vec::with_capacity(tables.len() * Partial::packed_len(shape));
    for part in b.cross_attention_partials(q, pool, tables, visible, shape)? {
        part.pack_into(&mut packed);
    }
    let all = gather_equal(group, &packed, "attention partials")?;
    let mut o = vec![0.0; tables.len() * qd];
    for (i, row) in o.chunks_exact_mut(qd).enumerate() {
        finalize(&Partial::merge_gathered(&all, i, shape), shape, row);
    }
    Ok(b.upload_owned(o)?)
}

/// Sliding-window attention of `n` new rows after a layer's kept rows (`state`: the last ≤ W−1
/// rotated keys and values and their count), which it then advances.
#[allow(clippy::too_many_arguments)]
fn window_step<B: Backend>(
    b: &B,
    q: &B::Buf,
    k: &B::Buf,
    v: &B::Buf,
    n: usize,
    state: (&mut B::Buf, &mut B::Buf, &mut usize),
    window: usize,
    heads: usize,
    hd: usize,
) -> Result<B::Buf> {
    let (keys, values, rows) = state;
    let qd = heads * hd;
    let prefix = *rows;
    let all_k = b.concat(keys, prefix, k, n, qd)?;
    let all_v = b.concat(values, prefix, v, n, qd)?;
    let o = b.window_attention(q, &all_k, &all_v, n, prefix, window, heads, hd)?;
    let keep = (prefix + n).min(window - 1);
    let tail = prefix + n - keep..prefix + n;
    *keys = b.rows(&all_k, qd, tail.clone())?;
    *values = b.rows(&all_v, qd, tail)?;
    *rows = keep;
    Ok(o)
}
