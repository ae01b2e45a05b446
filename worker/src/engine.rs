//! The engine of one rank: sequences with their caches, and `step`, which advances a batch of
//! sequences by some tokens each (prefill chunks and decode tokens mixed) and returns the logits
//! asked for. The cross-decoder runs only for rows whose logits are wanted (prefill early exit).
//!
//! In a group of P ranks every rank runs the same steps (SPMD). A prefill item's tokens are cut
//! into one contiguous chunk per rank; each rank runs the self-decoder on its chunk (exchanging
//! retention states or window halos) and keeps its chunk's K/V: its shard of the global cache.
//! A decode item is run by every rank on the same token; its K/V is kept by the rank with the
//! smallest shard. Cross-attention merges every rank's partial over its shard.
//!
//! With tensor parallelism the group is a `tp × cp` grid: the ranks above are its columns'
//! (context-parallel) ranks, and the `tp` ranks of a row run the same items on their parts of
//! the heads, keeping their KV heads of the row's cache shard.

use std::collections::HashMap;
use std::sync::Arc;

use crate::cache::{BlockPool, CacheError, KvSeq, LayerState};
use crate::cache_groups::last_level_cache_bytes;
use crate::comm::{Collective, CommError, Grid, Spent};
use crate::cp::{chunk, even_split, validate_split};
use crate::kernels::cross_attention::KvView;
use crate::kernels::kv_block::CacheDtype;
use crate::model::{Model, Segment, Shard};

pub type SeqId = u64;
/// A prefix-cache snapshot: a sequence frozen at a position, to resume other sequences from.
pub type SnapshotId = u64;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("unknown sequence {0}")]
    UnknownSequence(SeqId),
    #[error("unknown prefix-cache snapshot {0}")]
    UnknownSnapshot(SnapshotId),
    #[error("sequence {0} already exists")]
    DuplicateSequence(SeqId),
    #[error("sequence {0} appears twice in one step")]
    SequenceTwiceInStep(SeqId),
    #[error("sequence {0}: a step item needs at least one token")]
    EmptyItem(SeqId),
    #[error("token id {token} is out of the vocabulary (size {vocab})")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("sequence {seq}: {reason}")]
    BadSplit { seq: SeqId, reason: String },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("rank {rank} cannot take this step: {reason}")]
    PeerRefused { rank: usize, reason: String },
    #[error("collective failed, the group must be re-formed: {0}")]
    Comm(#[from] CommError),
}

/// Which logits a step item wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None: a prefill chunk that is not the prompt's last (the cross-decoder is skipped).
    None,
    /// The last token's: to sample the next token.
    Last,
    /// Every token's: prompt log-probabilities (the cross-decoder runs for each position).
    All,
}

/// How an item's tokens are spread over the ranks of the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Cut into one contiguous chunk per rank (context-parallel prefill), at the given chunk
    /// starts or, when `None`, evenly.
    Sharded(Option<Vec<usize>>),
    /// Run by every rank (decode); each token's K/V is kept by the rank with the smallest shard.
    Replicated,
}

pub struct StepItem<'a> {
    pub seq: SeqId,
    pub tokens: &'a [u32],
    pub logits: Logits,
    pub placement: Placement,
}

impl<'a> StepItem<'a> {
    /// Prompt tokens, cut evenly across the ranks.
    pub fn prefill(seq: SeqId, tokens: &'a [u32], logits: Logits) -> Self {
        StepItem { seq, tokens, logits, placement: Placement::Sharded(None) }
    }
    /// Generated tokens, run by every rank; their logits come back.
    pub fn decode(seq: SeqId, tokens: &'a [u32]) -> Self {
        StepItem { seq, tokens, logits: Logits::Last, placement: Placement::Replicated }
    }
}

#[derive(Debug)]
pub struct StepOutput {
    pub seq: SeqId,
    /// `[rows, vocab]`: one row for `Last`, one per token for `All`, none for `None`.
    pub logits: ItemLogits,
}

/// One item's rows of a step's logits: a range of the step's single buffer, shared by its
/// items, so that handing each item its rows copies nothing (32 decoding sequences of a
/// 100K vocabulary would copy 12.8 MB a step). Reads as a `[f32]`.
#[derive(Clone)]
pub struct ItemLogits {
    step: Arc<Vec<f32>>,
    rows: std::ops::Range<usize>,
}

impl ItemLogits {
    /// The rows as a vector of their own (a copy unless the item holds the whole buffer).
    pub fn into_vec(self) -> Vec<f32> {
        match Arc::try_unwrap(self.step) {
            Ok(mut all) if self.rows.start == 0 => {
                all.truncate(self.rows.end);
                all
            }
            Ok(all) => all[self.rows].to_vec(),
            Err(shared) => shared[self.rows].to_vec(),
        }
    }
}

impl std::ops::Deref for ItemLogits {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.step[self.rows.clone()]
    }
}

impl std::fmt::Debug for ItemLogits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ItemLogits({} values)", self.rows.len())
    }
}

impl PartialEq for ItemLogits {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

/// Steps of up to this many logit rows keep their buffer for the next step (25.6 MB at a 100K
/// vocabulary); a prefill's `Logits::All` rows are not held on to.
const RECYCLE_LOGITS_ROWS: usize = 64;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Positions per global-cache block.
    pub block_tokens: usize,
    /// Bytes the global KV cache may use.
    pub cache_budget_bytes: usize,
    /// Element type of the global KV cache (computation stays f32).
    pub cache_dtype: CacheDtype,
    /// Bytes of last-level CPU cache the cross-decoder plans its row groups for
    /// ([`crate::cache_groups`]): by default what the CPU reports; `usize::MAX` never groups.
    pub cache_reuse_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            block_tokens: 256,
            cache_budget_bytes: 8 << 30,
            cache_dtype: CacheDtype::F32,
            cache_reuse_bytes: last_level_cache_bytes(),
        }
    }
}

struct Sequence {
    /// Tokens seen so far: the position of the next token.
    pos: usize,
    self_state: Vec<LayerState>,
    /// This rank's shard of the sequence's global cache.
    kv: KvSeq,
    /// Every rank's shard length, so that all ranks agree on who keeps a decode token's K/V.
    shard_lens: Vec<usize>,
}

/// What resuming a sequence at a position needs: the self-decoder state there and the global
/// cache before it (this rank's shard, sharing the blocks of the sequence it was taken from).
struct Snapshot {
    pos: usize,
    self_state: Vec<LayerState>,
    kv: KvSeq,
    shard_lens: Vec<usize>,
}

/// Where an item's rows live on this rank for one step.
struct Placed {
    /// This rank's tokens of the item.
    rows: std::ops::Range<usize>,
    shard: Option<Shard>,
    /// Per token of the whole item, the rank that keeps its K/V.
    owners: Vec<usize>,
}

pub struct Engine {
    model: Arc<Model>,
    pool: BlockPool,
    seqs: HashMap<SeqId, Sequence>,
    snapshots: HashMap<SnapshotId, Snapshot>,
    grid: Grid,
    /// Last-level cache bytes for the cross-decoder's row groups (`EngineOptions`).
    cache_reuse_bytes: usize,
    /// The last step's logits, whose allocation the next step reuses once its outputs are gone
    /// (decode-sized steps only: see `RECYCLE_LOGITS_ROWS`).
    last_logits: Option<Arc<Vec<f32>>>,
    /// Set when a collective failed mid-step: this rank's state no longer matches its peers'.
    broken: Option<CommError>,
}

impl Engine {
    /// A single-process engine.
    pub fn new(model: Arc<Model>, opts: &EngineOptions) -> Self {
        Self::on_grid(model, opts, Grid::single())
    }

    /// One rank of a group whose ranks talk through `comm`: a `tp × cp` grid with `tp` the
    /// model's tensor-parallel size, rank `r` at tensor-parallel index `r % tp`, which must be
    /// the part of the weights the model holds.
    pub fn with_group(model: Arc<Model>, opts: &EngineOptions, comm: Box<dyn Collective>) -> Result<Self, EngineError> {
        let grid = Grid::new(comm, model.tp.size)?;
        if grid.tp_rank() != model.tp.rank {
            return Err(EngineError::Comm(CommError::Setup(format!(
                "rank {} is tensor-parallel rank {} of {}, but holds the weights of rank {}",
                grid.rank(),
                grid.tp_rank(),
                grid.tp_size(),
                model.tp.rank
            ))));
        }
        Ok(Self::on_grid(model, opts, grid))
    }

    fn on_grid(model: Arc<Model>, opts: &EngineOptions, grid: Grid) -> Self {
        let pool = BlockPool::with_dtype(opts.block_tokens, model.kv_dim(), opts.cache_budget_bytes, opts.cache_dtype);
        Engine {
            model,
            pool,
            seqs: HashMap::new(),
            snapshots: HashMap::new(),
            grid,
            cache_reuse_bytes: opts.cache_reuse_bytes,
            last_logits: None,
            broken: None,
        }
    }

    /// Seconds spent in collectives (waiting for peers included) since the last call.
    pub fn take_collective_seconds(&mut self) -> f64 {
        self.take_collective_spent().total().as_secs_f64()
    }

    /// Time spent in collectives since the last call, by the sub-group they ran on.
    pub fn take_collective_spent(&mut self) -> Spent {
        self.grid.take_spent()
    }

    /// This rank in the whole group (`cp_rank · tp + tp_rank`).
    pub fn rank(&self) -> usize {
        self.grid.rank()
    }
    /// Ranks of the whole group.
    pub fn world(&self) -> usize {
        self.grid.world()
    }
    /// Ranks that split the tokens (each holds a shard of every global cache).
    pub fn cp_size(&self) -> usize {
        self.grid.cp_size()
    }
    pub fn cp_rank(&self) -> usize {
        self.grid.cp_rank()
    }
    /// Ranks that split the weights (each holds its KV heads of the cache shard).
    pub fn tp_size(&self) -> usize {
        self.grid.tp_size()
    }
    /// The collective failure that broke this rank's group, if any.
    pub fn broken(&self) -> Option<&CommError> {
        self.broken.as_ref()
    }
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn add_sequence(&mut self, id: SeqId) -> Result<(), EngineError> {
        if self.seqs.contains_key(&id) {
            return Err(EngineError::DuplicateSequence(id));
        }
        let seq = Sequence {
            pos: 0,
            self_state: self.model.new_self_state(),
            kv: KvSeq::default(),
            shard_lens: vec![0; self.cp_size()],
        };
        self.seqs.insert(id, seq);
        Ok(())
    }

    /// A new sequence that continues from snapshot `from`: it shares the snapshot's cache blocks
    /// and starts with a copy of its self-decoder state, so its next token is at the snapshot's
    /// position.
    pub fn add_sequence_from(&mut self, id: SeqId, from: SnapshotId) -> Result<(), EngineError> {
        if self.seqs.contains_key(&id) {
            return Err(EngineError::DuplicateSequence(id));
        }
        let snap = self.snapshots.get(&from).ok_or(EngineError::UnknownSnapshot(from))?;
        let seq = Sequence {
            pos: snap.pos,
            self_state: snap.self_state.clone(),
            kv: snap.kv.share(&mut self.pool),
            shard_lens: snap.shard_lens.clone(),
        };
        self.seqs.insert(id, seq);
        Ok(())
    }

    /// Saves sequence `seq` as it is now under `id` (replacing an older snapshot of that id).
    /// The snapshot shares the sequence's cache blocks; only the self-decoder state is copied.
    pub fn snapshot(&mut self, seq: SeqId, id: SnapshotId) -> Result<(), EngineError> {
        let s = self.seqs.get(&seq).ok_or(EngineError::UnknownSequence(seq))?;
        let snap = Snapshot {
            pos: s.pos,
            self_state: s.self_state.clone(),
            kv: s.kv.share(&mut self.pool),
            shard_lens: s.shard_lens.clone(),
        };
        if let Some(mut old) = self.snapshots.insert(id, snap) {
            old.kv.free(&mut self.pool);
        }
        Ok(())
    }

    /// Drops a snapshot; its blocks go back to the pool unless sequences still share them.
    pub fn drop_snapshot(&mut self, id: SnapshotId) -> bool {
        match self.snapshots.remove(&id) {
            Some(mut snap) => {
                snap.kv.free(&mut self.pool);
                true
            }
            None => false,
        }
    }

    /// Snapshots held, and the bytes of self-decoder state they copy.
    pub fn snapshot_usage(&self) -> (usize, usize) {
        let bytes = self.snapshots.values().flat_map(|s| &s.self_state).map(LayerState::bytes).sum();
        (self.snapshots.len(), bytes)
    }

    /// The position a snapshot resumes at.
    pub fn snapshot_len(&self, id: SnapshotId) -> Option<usize> {
        self.snapshots.get(&id).map(|s| s.pos)
    }

    /// Frees a sequence and its cache blocks; false if it did not exist.
    pub fn free_sequence(&mut self, id: SeqId) -> bool {
        match self.seqs.remove(&id) {
            Some(mut seq) => {
                seq.kv.free(&mut self.pool);
                true
            }
            None => false,
        }
    }

    pub fn sequence_len(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.pos)
    }

    /// Bytes of global cache a sequence holds (whole blocks).
    pub fn sequence_cache_bytes(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.kv.n_blocks() * self.pool.block_bytes())
    }

    /// Bytes of self-decoder state a sequence holds (constant in its length).
    pub fn sequence_state_bytes(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.self_state.iter().map(LayerState::bytes).sum())
    }

    /// This rank's global-cache rows of a sequence (its shard).
    pub fn sequence_shard_len(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.kv.len())
    }

    /// Advances every item's sequence by its tokens. On an error before any collective (a bad
    /// item, a cache budget exhausted on any rank), no sequence changes on any rank. A failed
    /// collective leaves the group broken: every later step fails until it is re-formed.
    pub fn step(&mut self, items: &[StepItem]) -> Result<Vec<StepOutput>, EngineError> {
        if let Some(e) = &self.broken {
            return Err(EngineError::Comm(e.clone()));
        }
        self.validate(items)?;
        let mut seqs: Vec<Sequence> = items.iter().map(|it| self.seqs.remove(&it.seq).expect("validated")).collect();
        let placed: Vec<Placed> = items.iter().zip(&seqs).map(|(it, seq)| self.place(it, seq)).collect();
        let reserved = reserve_all(&mut seqs, &placed, self.cp_rank(), &mut self.pool);
        let result = self.agree(reserved.err()).and_then(|()| self.forward(items, &placed, &mut seqs));
        if let Err(e) = &result {
            if let EngineError::Comm(c) = e {
                self.broken = Some(c.clone());
            }
            for seq in &mut seqs {
                seq.kv.trim(&mut self.pool);
            }
        }
        for (it, seq) in items.iter().zip(seqs) {
            self.seqs.insert(it.seq, seq);
        }
        result
    }

    fn validate(&self, items: &[StepItem]) -> Result<(), EngineError> {
        let vocab = self.model.cfg.vocab_size;
        for (i, it) in items.iter().enumerate() {
            if !self.seqs.contains_key(&it.seq) {
                return Err(EngineError::UnknownSequence(it.seq));
            }
            if items[..i].iter().any(|o| o.seq == it.seq) {
                return Err(EngineError::SequenceTwiceInStep(it.seq));
            }
            if it.tokens.is_empty() {
                return Err(EngineError::EmptyItem(it.seq));
            }
            if let Some(&token) = it.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(EngineError::TokenOutOfRange { token, vocab });
            }
            if let Placement::Sharded(Some(starts)) = &it.placement {
                validate_split(starts, it.tokens.len(), self.cp_size())
                    .map_err(|reason| EngineError::BadSplit { seq: it.seq, reason })?;
            }
        }
        Ok(())
    }

    fn place(&self, it: &StepItem, seq: &Sequence) -> Placed {
        let (rank, world, n) = (self.cp_rank(), self.cp_size(), it.tokens.len());
        match &it.placement {
            Placement::Sharded(starts) => {
                let starts = starts.clone().unwrap_or_else(|| even_split(n, world));
                let chunk_lens: Vec<usize> = (0..world).map(|r| chunk(&starts, n, r).len()).collect();
                let owners = (0..world).flat_map(|r| std::iter::repeat_n(r, chunk_lens[r])).collect();
                Placed { rows: chunk(&starts, n, rank), shard: Some(Shard { rank, chunk_lens }), owners }
            }
            Placement::Replicated => {
                let mut lens = seq.shard_lens.clone();
                let owners = (0..n)
                    .map(|_| {
                        let owner = (0..world).min_by_key(|&r| (lens[r], r)).expect("world >= 1");
                        lens[owner] += 1;
                        owner
                    })
                    .collect();
                Placed { rows: 0..n, shard: None, owners }
            }
        }
    }

    /// Every rank says whether it can take the step; all go ahead only if all can.
    fn agree(&mut self, local: Option<EngineError>) -> Result<(), EngineError> {
        if self.world() == 1 {
            return local.map_or(Ok(()), Err);
        }
        let flags = self.grid.all().all_gather(&[if local.is_some() { 1.0 } else { 0.0 }])?;
        if let Some(e) = local {
            return Err(e);
        }
        match flags.iter().position(|f| f.first() != Some(&0.0)) {
            Some(rank) => {
                Err(EngineError::PeerRefused { rank, reason: "its share of the global KV cache is full".into() })
            }
            None => Ok(()),
        }
    }

    fn forward(
        &mut self,
        items: &[StepItem],
        placed: &[Placed],
        seqs: &mut [Sequence],
    ) -> Result<Vec<StepOutput>, EngineError> {
        let model = Arc::clone(&self.model);
        let rank = self.cp_rank();
        let mut segments = Vec::with_capacity(items.len());
        let mut positions = Vec::new();
        let mut tokens = Vec::new();
        for ((it, p), seq) in items.iter().zip(placed).zip(seqs.iter()) {
            let start = tokens.len();
            tokens.extend_from_slice(&it.tokens[p.rows.clone()]);
            positions.extend(seq.pos + p.rows.start..seq.pos + p.rows.end);
            segments.push(Segment {
                rows: start..tokens.len(),
                start_pos: seq.pos + p.rows.start,
                shard: p.shard.clone(),
            });
        }
        let mut x = model.embed(&tokens, &mut self.grid)?;
        let rope = model.self_rope(&positions);
        for layer in 0..model.self_layers.len() {
            let mut states: Vec<&mut LayerState> = seqs.iter_mut().map(|s| &mut s.self_state[layer]).collect();
            model.self_layer(layer, &mut x, &segments, &mut states, &rope, &mut self.grid)?;
        }
        let (k, v) = model.kv_project(&x, &positions);
        let kvd = model.kv_dim();
        for (((it, seg), p), seq) in items.iter().zip(&segments).zip(placed).zip(seqs.iter_mut()) {
            seq.pos += it.tokens.len();
            for (i, row) in seg.rows.clone().enumerate() {
                if p.owners[p.rows.start + i] == rank {
                    let r = row * kvd..(row + 1) * kvd;
                    seq.kv.append(&mut self.pool, positions[row], &k[r.clone()], &v[r]);
                }
            }
            for &owner in &p.owners {
                seq.shard_lens[owner] += 1;
            }
        }

        // Early exit: only rows whose logits are wanted enter the cross-decoder, and every rank
        // runs it on the same rows (gathered from the ranks that hold them).
        let dim = model.cfg.dim;
        let mut local_rows = Vec::new();
        for ((it, seg), p) in items.iter().zip(&segments).zip(placed) {
            let wanted = wanted_rows(it);
            let mine = wanted.start.max(p.rows.start)..wanted.end.min(p.rows.end);
            if p.shard.is_some() {
                for i in mine {
                    local_rows.extend_from_slice(&x[(seg.rows.start + i - p.rows.start) * dim..][..dim]);
                }
            }
        }
        let gathered = if self.cp_size() > 1 && placed.iter().any(|p| p.shard.is_some()) {
            self.grid.cp().all_gather(&local_rows)?
        } else {
            vec![local_rows]
        };
        let mut offsets = vec![0usize; gathered.len()];
        let mut rows_x = Vec::new();
        let mut rows_pos = Vec::new();
        let mut rows_seq = Vec::new();
        let mut counts = Vec::with_capacity(items.len());
        for (i, ((it, seg), (p, seq))) in items.iter().zip(&segments).zip(placed.iter().zip(seqs.iter())).enumerate() {
            let wanted = wanted_rows(it);
            counts.push(wanted.len());
            let first_pos = seq.pos - it.tokens.len();
            for t in wanted {
                let row = match &p.shard {
                    // Rows cut across ranks come from the gathered buffers, in rank order.
                    Some(_) => {
                        let owner = p.owners[t];
                        let off = offsets[owner];
                        offsets[owner] += dim;
                        gathered[owner].get(off..off + dim).ok_or(CommError::Protocol {
                            peer: owner,
                            reason: "fewer cross-decoder rows than the plan says".into(),
                        })?
                    }
                    None => &x[(seg.rows.start + t) * dim..][..dim],
                };
                rows_x.extend_from_slice(row);
                rows_pos.push(first_pos + t);
                rows_seq.push(i);
            }
        }
        let logits = if rows_pos.is_empty() {
            Vec::new()
        } else {
            let views: Vec<KvView> = seqs.iter().map(|s| s.kv.view(&self.pool)).collect();
            let row_views: Vec<&KvView> = rows_seq.iter().map(|&i| &views[i]).collect();
            let visible: Vec<usize> =
                rows_seq.iter().zip(&rows_pos).map(|(&i, &pos)| seqs[i].kv.rows_upto(pos)).collect();
            let x =
                model.cross_decode(rows_x, &rows_pos, &row_views, &visible, self.cache_reuse_bytes, &mut self.grid)?;
            // The last step's buffer, if its outputs have all been dropped.
            let buf = self.last_logits.take().and_then(|b| Arc::try_unwrap(b).ok()).unwrap_or_default();
            model.logits_into(&x, &mut self.grid, buf)?
        };
        let vocab = model.cfg.vocab_size;
        let step = Arc::new(logits);
        if step.len() <= RECYCLE_LOGITS_ROWS * vocab {
            self.last_logits = Some(Arc::clone(&step));
        }
        let mut start = 0;
        Ok(items
            .iter()
            .zip(counts)
            .map(|(it, n)| {
                let rows = start * vocab..(start + n) * vocab;
                start += n;
                StepOutput { seq: it.seq, logits: ItemLogits { step: Arc::clone(&step), rows } }
            })
            .collect())
    }

    /// Broadcasts `data` from `root` to every rank of the group.
    pub fn broadcast(&mut self, root: usize, data: &mut Vec<f32>) -> Result<(), EngineError> {
        if let Err(e) = self.grid.all().broadcast(root, data) {
            self.broken = Some(e.clone());
            return Err(e.into());
        }
        Ok(())
    }

    /// Gives every sequence's and snapshot's blocks back, e.g. when a broken group is re-formed.
    pub fn clear(&mut self) {
        for (_, mut seq) in self.seqs.drain() {
            seq.kv.free(&mut self.pool);
        }
        for (_, mut snap) in self.snapshots.drain() {
            snap.kv.free(&mut self.pool);
        }
    }
}

/// The item's tokens (indices into `it.tokens`) whose logits are wanted.
fn wanted_rows(it: &StepItem) -> std::ops::Range<usize> {
    let n = it.tokens.len();
    match it.logits {
        Logits::None => n..n,
        Logits::Last => n - 1..n,
        Logits::All => 0..n,
    }
}

/// Reserves cache blocks for this rank's share of every item, or gives back what it took.
fn reserve_all(seqs: &mut [Sequence], placed: &[Placed], rank: usize, pool: &mut BlockPool) -> Result<(), EngineError> {
    for i in 0..seqs.len() {
        let mine = placed[i].owners.iter().filter(|&&o| o == rank).count();
        if let Err(e) = seqs[i].kv.reserve(pool, mine) {
            for seq in &mut seqs[..i] {
                seq.kv.trim(pool);
            }
            return Err(e.into());
        }
    }
    Ok(())
}
