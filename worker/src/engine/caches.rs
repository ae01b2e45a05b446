//! A sequence's caches on the backend and their bookkeeping: the self-decoder's constant-size
//! states, and this rank's shard of the global cache as reference-counted blocks of a pool with
//! a byte budget. A prefix-cache snapshot shares the blocks of the sequence it was taken from,
//! and a sequence resumed from it shares the snapshot's; a shared, partly filled last block is
//! copied before its first write (copy-on-write), so sharing never changes what another holder
//! reads. Running out of budget is an error the caller can act on (queue, reject), and blocks
//! are taken for a whole step or not at all.

use crate::backend::{Backend, BackendError};
use crate::kernels::kv_block::CacheDtype;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CacheError {
    #[error(
        "global KV cache budget exhausted: need {needed} more blocks of {block_tokens} tokens, \
         {free} free of {total} ({budget_bytes} bytes budget)"
    )]
    OutOfBudget { needed: usize, free: usize, total: usize, block_tokens: usize, budget_bytes: usize },
}

/// The global cache's blocks (on the backend) and who holds each.
pub struct BlockPool<B: Backend> {
    pub(super) storage: B::Pool,
    block_tokens: usize,
    kv_dim: usize,
    dtype: CacheDtype,
    budget_bytes: usize,
    /// Holders of each block: sequences and snapshots (0: free).
    refs: Vec<u32>,
    /// Free blocks, the lowest on top (a host pool allocates blocks on first use, so its memory
    /// follows its high-water mark).
    free: Vec<u32>,
}

impl<B: Backend> BlockPool<B> {
    /// A pool of `budget_bytes` of blocks of `block_tokens` positions, each row `kv_dim` wide for
    /// K and for V, in `dtype`.
    pub(super) fn new(
        b: &B,
        block_tokens: usize,
        kv_dim: usize,
        budget_bytes: usize,
        dtype: CacheDtype,
    ) -> Result<Self, BackendError> {
        let block_bytes = 2 * block_tokens * kv_dim * dtype.bytes();
        let blocks = (budget_bytes / block_bytes.max(1)).min(u32::MAX as usize);
        Ok(BlockPool {
            storage: b.kv_pool(dtype, blocks, block_tokens, kv_dim)?,
            block_tokens,
            kv_dim,
            dtype,
            budget_bytes,
            refs: vec![0; blocks],
            free: (0..blocks as u32).rev().collect(),
        })
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }
    pub fn block_bytes(&self) -> usize {
        2 * self.block_tokens * self.kv_dim * self.dtype.bytes()
    }
    pub fn dtype(&self) -> CacheDtype {
        self.dtype
    }
    pub fn total_blocks(&self) -> usize {
        self.refs.len()
    }
    pub fn used_blocks(&self) -> usize {
        self.refs.len() - self.free.len()
    }
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }
    pub fn used_bytes(&self) -> usize {
        self.used_blocks() * self.block_bytes()
    }
    /// Positions the whole pool can hold.
    pub fn capacity_tokens(&self) -> usize {
        self.total_blocks() * self.block_tokens
    }

    fn out_of_budget(&self, needed: usize) -> CacheError {
        CacheError::OutOfBudget {
            needed,
            free: self.free_blocks(),
            total: self.total_blocks(),
            block_tokens: self.block_tokens,
            budget_bytes: self.budget_bytes,
        }
    }

    fn take(&mut self) -> u32 {
        let id = self.free.pop().expect("the caller counted the free blocks");
        self.refs[id as usize] = 1;
        id
    }

    fn retain(&mut self, table: &[u32]) {
        for &id in table {
            self.refs[id as usize] += 1;
        }
    }

    fn release(&mut self, table: &[u32]) {
        for &id in table.iter().rev() {
            let refs = &mut self.refs[id as usize];
            *refs -= 1;
            if *refs == 0 {
                self.free.push(id);
            }
        }
    }

    /// Blocks `kv` takes to grow by `n` rows: new blocks, and a copy of a partly filled last
    /// block it shares.
    fn blocks_to_grow(&self, kv: &KvShard, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let bt = self.block_tokens;
        let shared_tail = !kv.rows.is_multiple_of(bt) && kv.table.last().is_some_and(|&b| self.refs[b as usize] > 1);
        (kv.rows + n).div_ceil(bt) - kv.rows.div_ceil(bt) + usize::from(shared_tail)
    }

    /// Takes the blocks that each of `kvs` needs to grow by `rows[i]` rows: all or none. A
    /// shared, partly filled last block is copied first.
    pub(super) fn reserve(&mut self, b: &B, kvs: &mut [&mut KvShard], rows: &[usize]) -> Result<(), ReserveError> {
        let needed: usize = kvs.iter().zip(rows).map(|(kv, &n)| self.blocks_to_grow(kv, n)).sum();
        if needed > self.free_blocks() {
            return Err(ReserveError::Cache(self.out_of_budget(needed)));
        }
        let bt = self.block_tokens;
        for (kv, &n) in kvs.iter_mut().zip(rows) {
            if n == 0 {
                continue;
            }
            if let Some(&tail) = kv.table.last().filter(|&&t| self.refs[t as usize] > 1) {
                if !kv.rows.is_multiple_of(bt) {
                    let copy = self.take();
                    b.kv_copy_block(&mut self.storage, tail, copy).map_err(ReserveError::Backend)?;
                    self.release(&[tail]);
                    *kv.table.last_mut().expect("a tail block") = copy;
                }
            }
            while kv.table.len() < (kv.rows + n).div_ceil(bt) {
                let id = self.take();
                kv.table.push(id);
            }
        }
        Ok(())
    }

    /// Gives back the blocks `kv` took beyond its rows (a step refused after `reserve`).
    pub(super) fn trim(&mut self, kv: &mut KvShard) {
        let keep = kv.rows.div_ceil(self.block_tokens);
        if kv.table.len() > keep {
            let extra = kv.table.split_off(keep);
            self.release(&extra);
        }
    }

    /// A block table of `shared` (blocks another holder keeps, now held once more) then new
    /// blocks filled with `blocks` ([`Backend::kv_write_block`]'s bytes): all or none.
    pub(super) fn restore(&mut self, b: &B, shared: &[u32], blocks: &[Vec<u8>]) -> Result<Vec<u32>, ReserveError> {
        if blocks.len() > self.free_blocks() {
            return Err(ReserveError::Cache(self.out_of_budget(blocks.len())));
        }
        let fresh: Vec<u32> = blocks.iter().map(|_| self.take()).collect();
        for (&id, bytes) in fresh.iter().zip(blocks) {
            if let Err(e) = b.kv_write_block(&mut self.storage, id, bytes) {
                self.release(&fresh);
                return Err(ReserveError::Backend(e));
            }
        }
        self.retain(shared);
        Ok(shared.iter().copied().chain(fresh).collect())
    }

    /// A second holder of `kv`'s blocks.
    pub(super) fn share(&mut self, kv: &KvShard) -> KvShard {
        self.retain(&kv.table);
        kv.clone()
    }

    /// Gives `kv`'s blocks back (to the free list, unless others still hold them).
    pub(super) fn free(&mut self, kv: &mut KvShard) {
        let table = std::mem::take(&mut kv.table);
        self.release(&table);
    }
}

#[derive(Debug)]
pub(super) enum ReserveError {
    Cache(CacheError),
    Backend(BackendError),
}

/// This rank's shard of one sequence's global cache: its blocks, which positions it holds (runs
/// of consecutive positions, in order; every position on a lone rank), and every
/// context-parallel rank's row count, so that all ranks agree on who keeps a decode token's K/V.
#[derive(Debug, Clone)]
pub(super) struct KvShard {
    pub(super) table: Vec<u32>,
    runs: Vec<(usize, usize)>,
    pub(super) rows: usize,
    pub(super) lens: Vec<usize>,
}

impl KvShard {
    pub(super) fn new(cp: usize) -> Self {
        KvShard { table: Vec::new(), runs: Vec::new(), rows: 0, lens: vec![0; cp] }
    }

    /// A shard from its parts (a restored snapshot's: `crate::engine::image`); the runs give
    /// its rows.
    pub(super) fn from_parts(table: Vec<u32>, runs: Vec<(usize, usize)>, lens: Vec<usize>) -> Self {
        let rows = runs.iter().map(|r| r.1).sum();
        KvShard { table, runs, rows, lens }
    }

    pub(super) fn runs(&self) -> &[(usize, usize)] {
        &self.runs
    }

    /// Rows of this shard at positions `..=pos`: what a query at `pos` sees of it.
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
}

/// One self-decoder layer's cache for one sequence, on the backend.
pub(super) enum State<B: Backend> {
    /// Gated retention: the `[heads, d, d]` state after the last token seen.
    Retention(B::Buf),
    /// Sliding window: the rotated keys and values of the last `rows` (≤ W−1) tokens.
    Window { keys: B::Buf, values: B::Buf, rows: usize },
}

/// A sequence's caches, or a snapshot of them: its position, the self-decoder's states, and
/// its shard of the global cache.
pub(super) struct Caches<B: Backend> {
    /// Tokens seen so far: the position of the next token.
    pub(super) pos: usize,
    pub(super) states: Vec<State<B>>,
    pub(super) kv: KvShard,
}

impl<B: Backend> Caches<B> {
    /// A copy of the states (on the backend) sharing the blocks (`pool` counts the new holder).
    /// `per`: numbers of a retention state; `width`: of a window's key or value row.
    pub(super) fn share(&self, b: &B, pool: &mut BlockPool<B>, per: usize, width: usize) -> Result<Self, BackendError> {
        let states = self
            .states
            .iter()
            .map(|s| {
                Ok(match s {
                    State::Retention(state) => State::Retention(b.rows(state, per, 0..1)?),
                    State::Window { keys, values, rows } => State::Window {
                        keys: b.rows(keys, width, 0..*rows)?,
                        values: b.rows(values, width, 0..*rows)?,
                        rows: *rows,
                    },
                })
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        Ok(Caches { pos: self.pos, states, kv: pool.share(&self.kv) })
    }
}

impl<B: Backend> State<B> {
    /// Bytes of the state (`per`, `width` as in [`Caches::share`]).
    pub(super) fn bytes(&self, per: usize, width: usize) -> usize {
        4 * match self {
            State::Retention(_) => per,
            State::Window { rows, .. } => 2 * rows * width,
        }
    }
}
