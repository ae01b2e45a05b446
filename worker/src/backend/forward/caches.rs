//! A sequence's caches on the backend and their bookkeeping: self-decoder states in their
//! slots, the rank's shard of the global cache as reference-counted blocks, prefix snapshots that
//! share those blocks (copy-on-write of a partly filled last block), and the all-or-none
//! reservation of blocks before a step.

use super::{Forward, ForwardError, Mixer, Result};
use crate::backend::Backend;

/// One self-decoder layer's cache for one sequence, on the backend.
pub(super) enum State<B: Backend> {
    /// In the layer's pool of states, at the sequence's slot.
    Retention,
    /// The last `rows` (≤ W−1) rotated keys and values.
    Window { keys: B::Buf, values: B::Buf, rows: usize },
}

/// A sequence's caches: the self-decoder's constant-size states and its blocks of the global
/// cache. Give it back with [`Forward::free`].
pub struct Sequence<B: Backend> {
    pub(super) pos: usize,
    /// This rank's shard of the sequence's global cache, in position order.
    pub(super) shard: Shard,
    /// The sequence's slot in every retention layer's pool of states.
    pub(super) slot: usize,
    pub(super) states: Vec<State<B>>,
    pub(super) table: Vec<u32>,
}

/// A sequence frozen at a cache block boundary (a prefix-cache snapshot): its self-decoder
/// states copied, its cache blocks shared. Resume sequences from it with
/// [`Forward::new_sequence_from`]; give it back with [`Forward::drop_snapshot`].
pub struct Snapshot<B: Backend> {
    pos: usize,
    shard: Shard,
    states: Vec<SavedState<B>>,
    table: Vec<u32>,
    state_bytes: usize,
}

enum SavedState<B: Backend> {
    /// The layer's retention state of the sequence, `[heads, d, d]`.
    Retention(B::Buf),
    Window {
        keys: B::Buf,
        values: B::Buf,
        rows: usize,
    },
}

/// Which positions of a sequence's global cache this rank holds: runs of consecutive
/// positions, in order (one run, every position, on a lone rank), and every rank's row count,
/// so that all ranks agree on who keeps a decode token's K/V.
#[derive(Debug, Clone)]
pub(super) struct Shard {
    /// `(first position, rows)`.
    pub(super) runs: Vec<(usize, usize)>,
    pub(super) rows: usize,
    pub(super) lens: Vec<usize>,
}

impl Shard {
    pub(super) fn new(world: usize) -> Self {
        Shard { runs: Vec::new(), rows: 0, lens: vec![0; world] }
    }

    /// Rows of this shard at positions `..=pos`.
    pub(super) fn rows_upto(&self, pos: usize) -> usize {
        self.runs.iter().map(|&(first, n)| if pos < first { 0 } else { n.min(pos - first + 1) }).sum()
    }

    /// This rank keeps `n` more rows, from position `first`.
    pub(super) fn push(&mut self, first: usize, n: usize) {
        if n == 0 {
            return;
        }
        match self.runs.last_mut() {
            Some((start, len)) if *start + *len == first => *len += n,
            _ => self.runs.push((first, n)),
        }
        self.rows += n;
    }

    /// The rank that keeps a replicated token's K/V: the smallest shard (ties: lower rank).
    pub(super) fn decode_owner(&self) -> usize {
        (0..self.lens.len()).min_by_key(|&r| (self.lens[r], r)).expect("at least one rank")
    }
}

impl<B: Backend> Snapshot<B> {
    /// The position a sequence resumed from it continues at.
    pub fn len(&self) -> usize {
        self.pos
    }
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }
    /// Bytes of self-decoder state it copies.
    pub fn state_bytes(&self) -> usize {
        self.state_bytes
    }
    /// What [`Sequence::growth`] says of a sequence resumed from it.
    pub(crate) fn growth(&self) -> (&[u32], usize, usize) {
        (&self.table, self.shard.rows, self.shard.decode_owner())
    }
}

impl<B: Backend> Sequence<B> {
    /// Tokens seen so far.
    pub fn len(&self) -> usize {
        self.pos
    }
    /// This rank's rows of the sequence's global cache (all of them on a lone rank).
    pub fn shard_rows(&self) -> usize {
        self.shard.rows
    }
    /// Its blocks, its shard's rows, and the rank that keeps its next decode token's K/V.
    pub(crate) fn growth(&self) -> (&[u32], usize, usize) {
        (&self.table, self.shard.rows, self.shard.decode_owner())
    }
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }
}

impl<B: Backend> Forward<B> {
    pub(super) fn take_block(&mut self) -> u32 {
        let b = self.free_blocks.pop().expect("the caller counted the free blocks");
        self.block_refs[b as usize] = 1;
        b
    }

    pub(super) fn release_blocks(&mut self, table: &[u32]) {
        for &b in table.iter().rev() {
            let refs = &mut self.block_refs[b as usize];
            *refs -= 1;
            if *refs == 0 {
                self.free_blocks.push(b);
            }
        }
    }

    /// Blocks a shard of `rows` rows over `table` takes to grow by `n` rows: new blocks, and a
    /// copy of a partly filled last block it shares (copy-on-write). `resumed`: the table is a
    /// snapshot's, which the growing sequence will share.
    pub(crate) fn blocks_to_grow(&self, table: &[u32], rows: usize, n: usize, resumed: bool) -> usize {
        let bt = self.opts.block_tokens;
        if n == 0 {
            return 0;
        }
        let holders = |b: u32| self.block_refs[b as usize] as usize + usize::from(resumed);
        let shared_tail = !rows.is_multiple_of(bt) && table.last().is_some_and(|&b| holders(b) > 1);
        (rows + n).div_ceil(bt) - rows.div_ceil(bt) + usize::from(shared_tail)
    }

    /// Takes the blocks that `seqs`, each growing by `rows[i]` rows of this rank's shard, need:
    /// all or none. A shared, partly filled last block is copied first, so that no block is
    /// ever written while another holder reads it.
    pub(super) fn reserve(&mut self, seqs: &mut [&mut Sequence<B>], rows: &[usize]) -> Result<()> {
        let total: usize =
            seqs.iter().zip(rows).map(|(s, &n)| self.blocks_to_grow(&s.table, s.shard.rows, n, false)).sum();
        if total > self.free_blocks.len() {
            return Err(ForwardError::CacheFull { needed: total, free: self.free_blocks.len() });
        }
        let bt = self.opts.block_tokens;
        for (s, &n) in seqs.iter_mut().zip(rows) {
            if n == 0 {
                continue;
            }
            if let Some(&tail) = s.table.last().filter(|&&b| self.block_refs[b as usize] > 1) {
                if !s.shard.rows.is_multiple_of(bt) {
                    let copy = self.take_block();
                    self.backend.kv_copy_block(&mut self.pool, tail, copy)?;
                    self.release_blocks(&[tail]);
                    *s.table.last_mut().expect("a tail block") = copy;
                }
            }
            while s.table.len() < (s.shard.rows + n).div_ceil(bt) {
                let b = self.take_block();
                s.table.push(b);
            }
        }
        Ok(())
    }

    /// Gives back the blocks a sequence took beyond its rows (a step refused after `reserve`).
    pub(super) fn trim(&mut self, seq: &mut Sequence<B>) {
        let keep = seq.shard.rows.div_ceil(self.opts.block_tokens);
        if seq.table.len() > keep {
            let extra = seq.table.split_off(keep);
            self.release_blocks(&extra);
        }
    }

    /// A sequence with empty caches, in a free state slot.
    pub fn new_sequence(&mut self) -> Result<Sequence<B>> {
        let slot = *self.free_slots.last().ok_or(ForwardError::NoFreeSlot(self.opts.max_sequences))?;
        let per = self.state_len();
        for pool in self.state_pools.iter_mut().flatten() {
            self.backend.zero(pool, slot * per..(slot + 1) * per)?;
        }
        let states = self
            .self_layers
            .iter()
            .map(|l| {
                Ok(match l.mixer {
                    Mixer::Retention { .. } => State::Retention,
                    Mixer::Window { .. } => {
                        State::Window { keys: self.backend.zeros(0)?, values: self.backend.zeros(0)?, rows: 0 }
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.free_slots.pop();
        Ok(Sequence { pos: 0, shard: Shard::new(self.world()), slot, states, table: Vec::new() })
    }

    /// Numbers of one sequence's state in a retention layer: `heads · d · d`.
    pub(super) fn state_len(&self) -> usize {
        self.cfg.n_self_heads * self.cfg.self_head_dim() * self.cfg.self_head_dim()
    }

    /// Returns a sequence's state slot, and its cache blocks that no snapshot shares, to the
    /// pools.
    pub fn free(&mut self, seq: Sequence<B>) {
        self.release_blocks(&seq.table);
        self.free_slots.push(seq.slot);
    }

    /// Saves `seq` as it is now: its states copied, its cache blocks shared (a partly filled
    /// last block is copied by whichever holder next writes to it).
    pub fn snapshot(&mut self, seq: &Sequence<B>) -> Result<Snapshot<B>> {
        let b = &self.backend;
        let (per, qd) = (self.state_len(), self.cfg.n_self_heads * self.cfg.self_head_dim());
        let mut state_bytes = 0;
        let states = seq
            .states
            .iter()
            .zip(&self.state_pools)
            .map(|(state, pool)| {
                Ok(match (state, pool) {
                    (State::Retention, Some(pool)) => {
                        state_bytes += per * 4;
                        SavedState::Retention(b.rows(pool, per, seq.slot..seq.slot + 1)?)
                    }
                    (State::Window { keys, values, rows }, None) => {
                        state_bytes += 2 * rows * qd * 4;
                        SavedState::Window {
                            keys: b.rows(keys, qd, 0..*rows)?,
                            values: b.rows(values, qd, 0..*rows)?,
                            rows: *rows,
                        }
                    }
                    _ => unreachable!("each layer's state is made for its mixer"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let table = seq.table.clone();
        for &blk in &table {
            self.block_refs[blk as usize] += 1;
        }
        Ok(Snapshot { pos: seq.pos, shard: seq.shard.clone(), states, table, state_bytes })
    }

    /// A new sequence that continues from `snap`: its states copied, its blocks shared.
    pub fn new_sequence_from(&mut self, snap: &Snapshot<B>) -> Result<Sequence<B>> {
        let mut seq = self.new_sequence()?;
        let (b, per, qd) = (&self.backend, self.state_len(), self.cfg.n_self_heads * self.cfg.self_head_dim());
        let restored = seq.states.iter_mut().zip(&mut self.state_pools).zip(&snap.states).try_for_each(
            |((state, pool), saved)| -> Result<()> {
                match (state, pool, saved) {
                    (State::Retention, Some(pool), SavedState::Retention(s)) => {
                        b.write_rows(pool, per, seq.slot, s, 1)?
                    }
                    (
                        State::Window { keys, values, rows },
                        None,
                        SavedState::Window { keys: k, values: v, rows: n },
                    ) => {
                        *keys = b.rows(k, qd, 0..*n)?;
                        *values = b.rows(v, qd, 0..*n)?;
                        *rows = *n;
                    }
                    _ => unreachable!("a snapshot's states are made for the model's mixers"),
                }
                Ok(())
            },
        );
        if let Err(e) = restored {
            self.free(seq);
            return Err(e);
        }
        for &blk in &snap.table {
            self.block_refs[blk as usize] += 1;
        }
        seq.table = snap.table.clone();
        seq.pos = snap.pos;
        seq.shard = snap.shard.clone();
        Ok(seq)
    }

    /// Gives a snapshot's blocks back (to the pool, unless sequences still share them).
    pub fn drop_snapshot(&mut self, snap: Snapshot<B>) {
        self.release_blocks(&snap.table);
    }
}
