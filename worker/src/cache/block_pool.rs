//! The global KV cache in fixed-size blocks from a pool with a byte budget. A sequence owns a
//! block table; appending never copies earlier positions, and running out of budget is an
//! error the caller can act on (queue, reject), never an abort.
//!
//! Blocks are reference-counted so that block tables can share them: a prefix-cache snapshot
//! shares the blocks of the sequence it was taken from, and a sequence resumed from a snapshot
//! shares the snapshot's. A table only ever writes rows at or past its own length, and a table
//! made by [`KvSeq::share`] copies its partly filled last block before its first write into it
//! (copy-on-write), so sharing never changes what another table reads.

use crate::kernels::cross_attention::KvView;
use crate::kernels::kv_block::{Block, BlockRef, CacheDtype};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CacheError {
    #[error(
        "global KV cache budget exhausted: need {needed} more blocks of {block_tokens} tokens, \
         {free} free of {total} ({budget_bytes} bytes budget)"
    )]
    OutOfBudget { needed: usize, free: usize, total: usize, block_tokens: usize, budget_bytes: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockId(u32);

/// Storage for cache blocks. Blocks are allocated lazily up to the budget and recycled through a
/// free list, so the pool's memory follows its high-water mark.
pub struct BlockPool {
    block_tokens: usize,
    kv_dim: usize,
    max_blocks: usize,
    budget_bytes: usize,
    dtype: CacheDtype,
    storage: Vec<Block>,
    /// Block tables holding each block (0 for a free block).
    refs: Vec<u32>,
    free: Vec<BlockId>,
}

impl BlockPool {
    /// A pool of f32 blocks of `block_tokens` positions, each row `kv_dim` wide for K and for V,
    /// holding at most `budget_bytes`.
    pub fn new(block_tokens: usize, kv_dim: usize, budget_bytes: usize) -> Self {
        Self::with_dtype(block_tokens, kv_dim, budget_bytes, CacheDtype::F32)
    }

    /// The same with elements of `dtype`: a half-precision pool holds twice the positions.
    pub fn with_dtype(block_tokens: usize, kv_dim: usize, budget_bytes: usize, dtype: CacheDtype) -> Self {
        assert!(block_tokens > 0 && kv_dim > 0);
        let block_bytes = 2 * block_tokens * kv_dim * dtype.bytes();
        BlockPool {
            block_tokens,
            kv_dim,
            max_blocks: (budget_bytes / block_bytes).min(u32::MAX as usize),
            budget_bytes,
            dtype,
            storage: Vec::new(),
            refs: Vec::new(),
            free: Vec::new(),
        }
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
        self.max_blocks
    }
    pub fn used_blocks(&self) -> usize {
        self.storage.len() - self.free.len()
    }
    pub fn free_blocks(&self) -> usize {
        self.max_blocks - self.used_blocks()
    }
    pub fn used_bytes(&self) -> usize {
        self.used_blocks() * self.block_bytes()
    }
    /// Positions the whole pool can hold.
    pub fn capacity_tokens(&self) -> usize {
        self.max_blocks * self.block_tokens
    }

    pub fn can_allocate(&self, n: usize) -> bool {
        n <= self.free_blocks()
    }

    fn out_of_budget(&self, needed: usize) -> CacheError {
        CacheError::OutOfBudget {
            needed,
            free: self.free_blocks(),
            total: self.max_blocks,
            block_tokens: self.block_tokens,
            budget_bytes: self.budget_bytes,
        }
    }

    fn allocate(&mut self) -> BlockId {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.storage.push(Block::zeros(self.dtype, 2 * self.block_tokens * self.kv_dim));
                self.refs.push(0);
                BlockId((self.storage.len() - 1) as u32)
            }
        };
        self.refs[id.0 as usize] = 1;
        id
    }

    fn retain(&mut self, id: BlockId) {
        self.refs[id.0 as usize] += 1;
    }

    /// Drops one table's hold on each block; a block nobody holds goes back to the free list.
    fn release(&mut self, ids: impl IntoIterator<Item = BlockId>) {
        for id in ids {
            let refs = &mut self.refs[id.0 as usize];
            assert!(*refs > 0, "block {id:?} released more often than it was held");
            *refs -= 1;
            if *refs == 0 {
                self.free.push(id);
            }
        }
    }

    /// Block tables holding a block.
    pub fn holders(&self, id: BlockId) -> u32 {
        self.refs[id.0 as usize]
    }

    pub fn block(&self, id: BlockId) -> BlockRef<'_> {
        self.storage[id.0 as usize].as_ref()
    }

    fn block_mut(&mut self, id: BlockId) -> &mut Block {
        &mut self.storage[id.0 as usize]
    }
}

/// One sequence's block table in the global cache. On a rank of a context-parallel group it
/// holds that rank's shard: rows in increasing position order, but not every position.
#[derive(Debug, Default)]
pub struct KvSeq {
    blocks: Vec<BlockId>,
    len: usize,
    /// Runs of consecutive positions: `(first position, first row, rows)`, increasing.
    extents: Vec<(usize, usize, usize)>,
    /// The last block is partly filled and shared with another table: copy it before writing.
    shared_tail: bool,
}

impl KvSeq {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that appending `tokens` positions would take from the pool (a shared last block
    /// that must be copied first included).
    pub fn blocks_needed(&self, pool: &BlockPool, tokens: usize) -> usize {
        let copy = usize::from(self.shared_tail && tokens > 0);
        (self.len + tokens).div_ceil(pool.block_tokens) - self.blocks.len() + copy
    }

    /// Takes from the pool every block that appending `tokens` positions needs, or none at all.
    pub fn reserve(&mut self, pool: &mut BlockPool, tokens: usize) -> Result<(), CacheError> {
        let needed = self.blocks_needed(pool, tokens);
        if !pool.can_allocate(needed) {
            return Err(pool.out_of_budget(needed));
        }
        if self.shared_tail && tokens > 0 {
            let tail = self.blocks.last_mut().expect("a shared tail is a block");
            let copy = pool.allocate();
            let (src, dst) = (tail.0 as usize, copy.0 as usize);
            pool.storage[dst] = pool.storage[src].clone();
            pool.release([std::mem::replace(tail, copy)]);
            self.shared_tail = false;
        }
        while self.blocks.len() < (self.len + tokens).div_ceil(pool.block_tokens) {
            self.blocks.push(pool.allocate());
        }
        Ok(())
    }

    /// A table reading the same rows as this one, sharing its blocks (none is copied now; the
    /// new table copies a partly filled last block before it writes into it).
    pub fn share(&self, pool: &mut BlockPool) -> KvSeq {
        let keep = self.len.div_ceil(pool.block_tokens);
        for &id in &self.blocks[..keep] {
            pool.retain(id);
        }
        KvSeq {
            blocks: self.blocks[..keep].to_vec(),
            len: self.len,
            extents: self.extents.clone(),
            shared_tail: !self.len.is_multiple_of(pool.block_tokens),
        }
    }

    /// Rows holding positions `<= pos`: the part of this shard a query at `pos` may see.
    pub fn rows_upto(&self, pos: usize) -> usize {
        let i = self.extents.partition_point(|&(p0, _, _)| p0 <= pos);
        match i.checked_sub(1).map(|i| self.extents[i]) {
            None => 0,
            Some((p0, row0, n)) => row0 + n.min(pos - p0 + 1),
        }
    }

    /// Appends K and V rows (`[n, kv_dim]` each) for positions `first_pos..` after
    /// [`KvSeq::reserve`] made room. Positions must increase across appends.
    pub fn append(&mut self, pool: &mut BlockPool, first_pos: usize, keys: &[f32], values: &[f32]) {
        let (bt, kvd) = (pool.block_tokens, pool.kv_dim);
        assert_eq!(keys.len(), values.len());
        let n = keys.len() / kvd;
        assert!(self.len + n <= self.blocks.len() * bt, "append beyond reserved blocks");
        for r in 0..n {
            let pos = self.len + r;
            let block = pool.block_mut(self.blocks[pos / bt]);
            let j = pos % bt;
            block.write(j * kvd, &keys[r * kvd..(r + 1) * kvd]);
            block.write((bt + j) * kvd, &values[r * kvd..(r + 1) * kvd]);
        }
        match self.extents.last_mut() {
            Some((p0, _, len)) if *p0 + *len == first_pos => *len += n,
            Some((p0, _, len)) => {
                assert!(first_pos >= *p0 + *len, "cache positions must increase");
                self.extents.push((first_pos, self.len, n));
            }
            None => self.extents.push((first_pos, 0, n)),
        }
        self.len += n;
    }

    pub fn view<'a>(&self, pool: &'a BlockPool) -> KvView<'a> {
        KvView {
            blocks: self.blocks.iter().map(|&id| pool.block(id)).collect(),
            block_tokens: pool.block_tokens,
            kv_dim: pool.kv_dim,
            len: self.len,
        }
    }

    /// Returns blocks reserved beyond what the current length uses.
    pub fn trim(&mut self, pool: &mut BlockPool) {
        let keep = self.len.div_ceil(pool.block_tokens);
        pool.release(self.blocks.drain(keep..));
    }

    /// Returns every block to the pool.
    pub fn free(&mut self, pool: &mut BlockPool) {
        pool.release(self.blocks.drain(..));
        self.len = 0;
        self.extents.clear();
        self.shared_tail = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first `n` elements of block `b` of a view, as f32.
    fn head(view: &KvView, b: usize, n: usize) -> Vec<f32> {
        (0..n).map(|i| view.blocks[b].get(i)).collect()
    }

    #[test]
    fn shard_positions_and_visibility() {
        let mut pool = BlockPool::new(4, 1, 1 << 20);
        let mut kv = KvSeq::default();
        // A shard holding positions 10..13, 20..22, 22 (merged), 30.
        for (pos, n) in [(10, 3), (20, 2), (22, 1), (30, 1)] {
            kv.reserve(&mut pool, n).unwrap();
            let rows = vec![pos as f32; n];
            kv.append(&mut pool, pos, &rows, &rows);
        }
        assert_eq!(kv.extents.len(), 3);
        let expect = [(0, 0), (9, 0), (10, 1), (12, 3), (19, 3), (20, 4), (22, 6), (29, 6), (30, 7), (1000, 7)];
        for (pos, rows) in expect {
            assert_eq!(kv.rows_upto(pos), rows, "pos {pos}");
        }
    }

    #[test]
    fn reserve_is_all_or_nothing_and_blocks_recycle() {
        // 3 blocks of 4 tokens × kv_dim 2: 3 · 2 · 4 · 2 · 4 bytes.
        let mut pool = BlockPool::new(4, 2, 3 * 64);
        assert_eq!(pool.total_blocks(), 3);
        let mut a = KvSeq::default();
        a.reserve(&mut pool, 5).unwrap();
        assert_eq!(a.n_blocks(), 2);
        let rows: Vec<f32> = (0..10).map(|v| v as f32).collect();
        a.append(&mut pool, 0, &rows, &rows);
        let mut b = KvSeq::default();
        let err = b.reserve(&mut pool, 5).unwrap_err();
        assert!(matches!(err, CacheError::OutOfBudget { needed: 2, free: 1, .. }), "{err}");
        assert_eq!(b.n_blocks(), 0, "a failed reserve takes nothing");
        a.reserve(&mut pool, 3).unwrap(); // fits in the block it has
        assert_eq!(a.n_blocks(), 2);
        let view = a.view(&pool);
        assert_eq!(view.len, 5);
        assert_eq!(head(&view, 1, 2), [8.0, 9.0]);
        a.free(&mut pool);
        assert_eq!(pool.used_blocks(), 0);
        b.reserve(&mut pool, 12).unwrap();
        assert_eq!(pool.used_blocks(), 3);
        assert_eq!(pool.storage.len(), 3, "freed blocks are reused, not reallocated");
    }

    #[test]
    fn shared_tables_copy_on_write_and_free_last_holder() {
        let mut pool = BlockPool::new(4, 1, 1 << 20);
        let rows = |from: usize, n: usize| (from..from + n).map(|v| v as f32).collect::<Vec<_>>();
        let mut a = KvSeq::default();
        a.reserve(&mut pool, 6).unwrap();
        a.append(&mut pool, 0, &rows(0, 6), &rows(0, 6));
        // A snapshot of `a` at 6 rows: both blocks shared, the second one half filled.
        let snap = a.share(&mut pool);
        assert_eq!(pool.used_blocks(), 2);
        assert!(a.blocks.iter().all(|&b| pool.holders(b) == 2));
        // The owner keeps writing past the snapshot's rows, in place.
        a.reserve(&mut pool, 1).unwrap();
        a.append(&mut pool, 6, &[100.0], &[100.0]);
        assert_eq!(pool.used_blocks(), 2, "the writer appends in place");
        // A sequence resumed from the snapshot copies the shared tail before writing into it.
        let mut b = snap.share(&mut pool);
        assert_eq!(b.blocks_needed(&pool, 1), 1, "the copy of the tail counts");
        b.reserve(&mut pool, 1).unwrap();
        b.append(&mut pool, 6, &[200.0], &[200.0]);
        assert_eq!(pool.used_blocks(), 3);
        assert_eq!(b.blocks[0], a.blocks[0], "full blocks stay shared");
        assert_ne!(b.blocks[1], a.blocks[1]);
        let (va, vb, vs) = (a.view(&pool), b.view(&pool), snap.view(&pool));
        assert_eq!(head(&va, 1, 3), [4.0, 5.0, 100.0]);
        assert_eq!(head(&vb, 1, 3), [4.0, 5.0, 200.0]);
        assert_eq!(head(&vs, 1, 2), [4.0, 5.0], "the snapshot's rows are untouched");
        assert_eq!((va.len, vb.len, vs.len), (7, 7, 6));
        // Blocks go back only when their last holder lets go.
        let mut snap = snap;
        a.free(&mut pool);
        assert_eq!(pool.used_blocks(), 3);
        snap.free(&mut pool);
        assert_eq!(pool.used_blocks(), 2, "a's tail block had only a and the snapshot");
        b.free(&mut pool);
        assert_eq!(pool.used_blocks(), 0);
    }
}
