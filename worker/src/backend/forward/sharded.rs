//! Context parallelism on the backend: a group's ranks each run the self-decoder on their chunk
//! of a prompt and exchange what their neighbours need, exactly as the CPU engine's ranks do
//! (`crate::model::Model::self_layer`, the arithmetic in `crate::cp`):
//!
//! - gated retention: each rank runs its chunk from a zero state, all-gathers its chunk state
//!   and log-decay, composes the state that precedes its chunk, and adds that state's
//!   contribution to its outputs (`Backend::retention_add_incoming`);
//! - sliding-window attention: each rank all-gathers the last W−1 rotated keys and values of
//!   its chunk (its halo), and attends over the halos before it;
//! - the cross-decoder: every rank runs the same rows (gathered from the ranks that computed
//!   them) over its shard of the cache, and the partial attentions are merged with log-sum-exp
//!   in rank order, so that every rank gets the same bits.
//!
//! What travels is small (states, halos, partials, the rows that enter the cross-decoder) and
//! goes through the host; activations and the cache stay on the device.

use std::ops::Range;

use super::GATE_LOGIT_NORMALIZER;
use super::{ffn, retention_out, window_step, Forward, ForwardError, Lin, Mixer, Result, Sequence, State};
use crate::backend::Backend;
use crate::comm::{Collective, CommError};
use crate::cp::{chunk, last_rows, retention_incoming};
use crate::kernels::cross_attention::{finalize, CrossShape, Partial};
use crate::kernels::retention::retention_log_decay;

fn protocol(peer: usize, reason: &str) -> ForwardError {
    ForwardError::Comm(CommError::Protocol { peer, reason: reason.into() })
}

/// Every rank's `data`, all the same length (else a protocol error).
fn gather_equal(group: &mut dyn Collective, data: &[f32], what: &str) -> Result<Vec<Vec<f32>>> {
    let all = group.all_gather(data)?;
    match all.iter().position(|p| p.len() != data.len()) {
        Some(peer) => Err(protocol(peer, &format!("{what} of different sizes across ranks"))),
        None => Ok(all),
    }
}

impl<B: Backend> Forward<B> {
    /// The self-decoder over this rank's chunk of `tokens` (cut at `starts`; its blocks
    /// reserved), exchanging with the other ranks layer by layer; its chunk's K/V written to
    /// its shard. Returns the output rows `wanted` of the whole step, gathered from the ranks
    /// that hold them (the same on every rank). A failed exchange breaks the group.
    pub(super) fn self_decode_sharded(
        &mut self,
        seq: &mut Sequence<B>,
        tokens: &[u32],
        starts: &[usize],
        wanted: Range<usize>,
    ) -> Result<B::Buf> {
        let result = self.sharded_rows(seq, tokens, starts, wanted);
        self.broken_by(result)
    }

    fn sharded_rows(
        &mut self,
        seq: &mut Sequence<B>,
        tokens: &[u32],
        starts: &[usize],
        wanted: Range<usize>,
    ) -> Result<B::Buf> {
        let (rank, world, n) = (self.rank(), self.world(), tokens.len());
        let chunk_lens: Vec<usize> = (0..world).map(|r| chunk(starts, n, r).len()).collect();
        let mine = chunk(starts, n, rank);
        let m = mine.len();
        let first = seq.pos + mine.start;
        let _span = tracing::debug_span!("sharded_prefill", rank, world, tokens = n, chunk = m, first).entered();
        let positions: Vec<u32> = (first..first + m).map(|p| p as u32).collect();
        let group = self.group.as_mut().expect("a sharded step runs in a group");
        let b = &self.backend;
        let cfg = &self.cfg;
        let (dim, eps) = (cfg.dim, cfg.norm_eps);
        let (heads, hd) = (cfg.n_self_heads, cfg.self_head_dim());
        let (qd, per) = (heads * hd, heads * hd * hd);
        let mm = |x: &B::Buf, rows: usize, l: &Lin<B>| b.matmul(x, rows, &l.w);
        // A rank with an empty chunk computes nothing but takes part in every exchange.
        let rope = if m > 0 { Some(b.rope_table(&self.rope_self, &positions)?) } else { None };
        let mut x = if m > 0 { Some(b.embed(&tokens[mine.clone()], &self.embed, (dim as f32).sqrt())?) } else { None };
        let slot = seq.slot;
        for ((l, state), pool) in self.self_layers.iter().zip(&mut seq.states).zip(&mut self.state_pools) {
            let xn = x.as_ref().map(|x| b.rms_norm(x, m, dim, Some(&l.norm), eps)).transpose()?;
            let mixed = match (&l.mixer, state) {
                (Mixer::Retention { q, k, v, g, gt, out }, State::Retention) => {
                    let states = pool.as_mut().expect("a retention layer has a state pool");
                    // This rank's chunk from a zero state: its outputs, its state, its decay.
                    let local = match (&xn, &rope) {
                        (Some(xn), Some(rope)) => {
                            let (mut qh, mut kh, vh) = (mm(xn, m, q)?, mm(xn, m, k)?, mm(xn, m, v)?);
                            b.rope(&mut qh, rope, heads, hd)?;
                            b.rope(&mut kh, rope, heads, hd)?;
                            let gamma = b.log_sigmoid_scaled(&mm(xn, m, gt)?, m * heads, GATE_LOGIT_NORMALIZER)?;
                            let mut zero = b.zeros(per)?;
                            let o = b.retention(&qh, &kh, &vh, &gamma, &mut zero, 0, m, heads, hd)?;
                            let gamma = b.download(&gamma)?[..m * heads].to_vec();
                            Some((qh, o, gamma, b.download(&zero)?[..per].to_vec()))
                        }
                        _ => None,
                    };
                    let packed = match &local {
                        Some((_, _, gamma, state)) => {
                            let mut p = state.clone();
                            p.extend(retention_log_decay(gamma, heads).iter().map(|&d| d as f32));
                            p
                        }
                        None => vec![0.0; per + heads],
                    };
                    let all = gather_equal(group, &packed, "retention states")?;
                    let parts: Vec<(&[f32], &[f32])> = all.iter().map(|p| (&p[..per], &p[per..])).collect();
                    let before = b.download(&b.rows(states, per, slot..slot + 1)?)?;
                    let (incoming, after) = retention_incoming(&before[..per], &parts, heads, rank);
                    b.write_rows(states, per, slot, &b.upload(&after)?, 1)?;
                    match (local, &xn) {
                        (Some((qh, mut o, gamma, _)), Some(xn)) => {
                            b.retention_add_incoming(&qh, &gamma, &incoming, &mut o, m, heads, hd)?;
                            Some(retention_out(b, xn, o, m, heads, hd, eps, g, out)?)
                        }
                        _ => None,
                    }
                }
                (Mixer::Window { q, k, v, out, window }, State::Window { keys, values, rows }) => {
                    let halo = window - 1;
                    let projected = match (&xn, &rope) {
                        (Some(xn), Some(rope)) => {
                            let (mut qh, mut kh, vh) = (mm(xn, m, q)?, mm(xn, m, k)?, mm(xn, m, v)?);
                            b.rope(&mut qh, rope, heads, hd)?;
                            b.rope(&mut kh, rope, heads, hd)?;
                            Some((qh, kh, vh))
                        }
                        _ => None,
                    };
                    // This rank's halo: the last W−1 rows of its chunk.
                    let tail = m.min(halo);
                    let mut packed = Vec::with_capacity(2 * tail * qd);
                    if let Some((_, kh, vh)) = &projected {
                        packed.extend_from_slice(&b.download(&b.rows(kh, qd, m - tail..m)?)?[..tail * qd]);
                        packed.extend_from_slice(&b.download(&b.rows(vh, qd, m - tail..m)?)?[..tail * qd]);
                    }
                    let all = group.all_gather(&packed)?;
                    let (mut tails_k, mut tails_v) = (Vec::with_capacity(world), Vec::with_capacity(world));
                    for (j, buf) in all.iter().enumerate() {
                        let len = chunk_lens[j].min(halo) * qd;
                        if buf.len() != 2 * len {
                            return Err(protocol(j, "a window halo of the wrong size"));
                        }
                        tails_k.push(&buf[..len]);
                        tails_v.push(&buf[len..]);
                    }
                    // The rows before this rank's chunk, and after the whole step.
                    let kept = *rows * qd;
                    let (own_k, own_v) = (b.download(keys)?, b.download(values)?);
                    let rows_before = |own: &[f32], tails: &[&[f32]], upto: usize| {
                        let mut parts: Vec<&[f32]> = vec![&own[..kept]];
                        parts.extend(&tails[..upto]);
                        last_rows(&parts, halo, qd)
                    };
                    let (prefix_k, prefix_v) =
                        (rows_before(&own_k, &tails_k, rank), rows_before(&own_v, &tails_v, rank));
                    let (after_k, after_v) =
                        (rows_before(&own_k, &tails_k, world), rows_before(&own_v, &tails_v, world));
                    let o = match &projected {
                        Some((qh, kh, vh)) => {
                            *keys = b.upload(&prefix_k)?;
                            *values = b.upload(&prefix_v)?;
                            *rows = prefix_k.len() / qd;
                            let o = window_step(b, qh, kh, vh, m, (keys, values, rows), *window, heads, hd)?;
                            Some(mm(&o, m, out)?)
                        }
                        None => None,
                    };
                    *rows = after_k.len() / qd;
                    *keys = b.upload(&after_k)?;
                    *values = b.upload(&after_v)?;
                    o
                }
                _ => unreachable!("each layer's state is made for its mixer"),
            };
            if let (Some(x), Some(mixed)) = (x.as_mut(), mixed) {
                b.add_assign(x, &mixed, m * dim)?;
                let ffn_out = ffn(b, &l.ffn, &b.rms_norm(x, m, dim, Some(&l.final_norm), eps)?, m, cfg.hidden_dim)?;
                b.add_assign(x, &ffn_out, m * dim)?;
            }
        }
        // This rank's chunk of the global cache.
        if let Some(x) = &x {
            let (k, v) = self.cache_rows(x, m, &positions)?;
            self.backend.kv_write(&mut self.pool, &seq.table, seq.shard.rows, &k, &v, m)?;
            seq.shard.push(first, m);
        }
        for (len, &n_r) in seq.shard.lens.iter_mut().zip(&chunk_lens) {
            *len += n_r;
        }
        seq.pos += n;
        // The rows that enter the cross-decoder, from the ranks that computed them.
        if wanted.is_empty() {
            return Ok(self.backend.zeros(0)?);
        }
        let b = &self.backend;
        let (lo, hi) = (wanted.start.max(mine.start), wanted.end.min(mine.end));
        let local = match &x {
            Some(x) if lo < hi => {
                b.download(&b.rows(x, dim, lo - mine.start..hi - mine.start)?)?[..(hi - lo) * dim].to_vec()
            }
            _ => Vec::new(),
        };
        let group = self.group.as_mut().expect("a sharded step runs in a group");
        let all = group.all_gather(&local)?;
        let mut rows = Vec::with_capacity(wanted.len() * dim);
        for (j, part) in all.iter().enumerate() {
            let theirs = chunk(starts, n, j);
            let count = wanted.end.min(theirs.end).saturating_sub(wanted.start.max(theirs.start));
            if part.len() != count * dim {
                return Err(protocol(j, "fewer cross-decoder rows than the step says"));
            }
            rows.extend_from_slice(part);
        }
        Ok(b.upload(&rows)?)
    }
}

/// Cross-attention of the query rows `q [rows, heads · head_dim]`, row i over the first
/// `visible[i]` rows of this rank's shard (`tables[i]`), merged with every rank's partials in
/// rank order: the attention over the whole cache, the same bits on every rank.
pub(super) fn attention_across_ranks<B: Backend>(
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
    Ok(b.upload(&o)?)
}
