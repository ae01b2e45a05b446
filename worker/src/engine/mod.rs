//! The engine of one rank, on any backend: sequences with their caches, and `step`, which
//! advances a batch of sequences by some tokens each (prefill chunks and decode tokens mixed)
//! and returns the logits asked for. The cross-decoder runs only for rows whose logits are
//! wanted (prefill early exit).
//!
//! The group is a `tp × cp` grid and every rank runs the same steps (SPMD). A prefill item's
//! tokens are cut into one contiguous chunk per context-parallel rank; each runs the
//! self-decoder on its chunk (exchanging retention states or window halos) and keeps its
//! chunk's K/V: its shard of the global cache. A decode item is run by every rank on the same
//! token; its K/V is kept by the rank with the smallest shard (`plan::decode_owner`).
//! Cross-attention merges every rank's partial over its shard. The `tp` ranks of a row run the
//! same items on their parts of the heads (`layers`), keeping their KV heads of the row's
//! cache shard.
//!
//! The model is written once (`forward`, over `layers`); the CPU ([`CpuBackend`]) and CUDA
//! backends run the same code.

mod caches;
mod forward;
mod image;
mod layers;

use std::collections::HashMap;
use std::sync::Arc;

pub use caches::{BlockPool, CacheError};
pub use image::{ParentShape, SnapshotImage, StateImage};
pub use layers::Weights;

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, BackendError};
use crate::cache_groups::last_level_cache_bytes;
use crate::comm::{Collective, CommError, Grid, SingleRank, Spent};
use crate::cp::{chunk, even_split, validate_split};
use crate::kernels::kv_block::CacheDtype;
use crate::model::Model;
pub use crate::plan::{SeqId, SnapshotId};
use caches::{Caches, KvShard, ReserveError, State};
use forward::{rows_of, CrossRows, Segment, Shard};

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("unknown sequence {0}")]
    UnknownSequence(SeqId),
    #[error("unknown prefix-cache snapshot {0}")]
    UnknownSnapshot(SnapshotId),
    #[error("prefix-cache snapshot image: {0}")]
    Snapshot(String),
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
    #[error("all {0} sequences this rank may hold are open (max_sequences)")]
    TooManySequences(usize),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("rank {rank} cannot take this step: {reason}")]
    PeerRefused { rank: usize, reason: String },
    #[error("collective failed, the group must be re-formed: {0}")]
    Comm(#[from] CommError),
    /// A backend failure (a device error): the rank's caches can no longer be trusted.
    #[error("{0}; this rank must load the model again")]
    Backend(#[from] BackendError),
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

/// How an item's tokens are spread over the context-parallel ranks.
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
    /// Sequences that may be open at once (0: no limit).
    pub max_sequences: usize,
    /// The type the CPU backend's large products compute in (`Engine::new` and `with_group`
    /// resolve `auto` against the model's weights; a backend made elsewhere has its own).
    pub compute_dtype: crate::weights::ComputeDtype,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            block_tokens: crate::plan::DEFAULT_BLOCK_TOKENS,
            cache_budget_bytes: 8 << 30,
            cache_dtype: CacheDtype::F32,
            cache_reuse_bytes: last_level_cache_bytes(),
            max_sequences: 0,
            compute_dtype: crate::weights::ComputeDtype::F32,
        }
    }
}

/// Where an item's rows live on this rank for one step.
struct Placed {
    /// This rank's tokens of the item.
    rows: std::ops::Range<usize>,
    shard: Option<Shard>,
    /// Per token of the whole item, the context-parallel rank that keeps its K/V.
    owners: Vec<usize>,
}

pub struct Engine<B: Backend = CpuBackend> {
    backend: B,
    weights: Weights<B>,
    pool: BlockPool<B>,
    seqs: HashMap<SeqId, Caches<B>>,
    snapshots: HashMap<SnapshotId, Caches<B>>,
    grid: Grid,
    opts: EngineOptions,
    /// The last step's logits, whose allocation the next step reuses once its outputs are gone
    /// (decode-sized steps only: see `RECYCLE_LOGITS_ROWS`).
    last_logits: Option<Arc<Vec<f32>>>,
    /// Set when a collective or the backend failed mid-step: this rank's state no longer
    /// matches its peers' (or cannot be trusted), and every later step fails with it.
    broken: Option<EngineError>,
    /// The threads a step runs on, where the backend's kernels use host threads: see
    /// [`Engine::step`].
    threads: Option<Arc<rayon::ThreadPool>>,
}

impl Engine<CpuBackend> {
    /// A single-process engine on the CPU.
    pub fn new(model: Arc<Model>, opts: &EngineOptions) -> Self {
        Self::on_backend(CpuBackend::for_model(&model, opts), &model, opts, Box::new(SingleRank))
            .expect("the CPU backend takes every model, and a lone rank forms no group")
    }

    /// One CPU rank of a group whose ranks talk through `comm` (see [`Engine::on_backend`]).
    pub fn with_group(model: Arc<Model>, opts: &EngineOptions, comm: Box<dyn Collective>) -> Result<Self, EngineError> {
        Self::on_backend(CpuBackend::for_model(&model, opts), &model, opts, comm)
    }
}

impl<B: Backend> Engine<B> {
    /// One rank on `backend` of a group whose ranks talk through `comm` (a lone rank:
    /// `SingleRank`): a `tp × cp` grid with `tp` the model's tensor-parallel size, rank `r` at
    /// tensor-parallel index `r % tp`, which must be the part of the weights `model` holds.
    pub fn on_backend(
        backend: B,
        model: &Model,
        opts: &EngineOptions,
        comm: Box<dyn Collective>,
    ) -> Result<Self, EngineError> {
        let mut grid = Grid::new(comm, model.tp.size)?;
        if grid.world() > 1 {
            backend.bind()?;
            let probe = backend.zeros(1)?;
            grid.agree_device_collectives(backend.device_buffer(&probe)?.is_some())?;
        }
        if grid.tp_rank() != model.tp.rank {
            return Err(EngineError::Comm(CommError::Setup(format!(
                "rank {} is tensor-parallel rank {} of {}, but holds the weights of rank {}",
                grid.rank(),
                grid.tp_rank(),
                grid.tp_size(),
                model.tp.rank
            ))));
        }
        if opts.block_tokens == 0 {
            return Err(EngineError::Comm(CommError::Setup("block_tokens must be positive".into())));
        }
        backend.bind()?;
        let threads = backend.host_threads().then(engine_threads).flatten();
        let weights = Weights::load(&backend, model)?;
        let pool =
            BlockPool::new(&backend, opts.block_tokens, weights.kv_dim(), opts.cache_budget_bytes, opts.cache_dtype)?;
        Ok(Engine {
            backend,
            weights,
            pool,
            seqs: HashMap::new(),
            snapshots: HashMap::new(),
            grid,
            opts: opts.clone(),
            last_logits: None,
            broken: None,
            threads,
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
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
    /// Ranks of the whole group (`tp · cp`).
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
    /// The failure that broke this rank, if any.
    pub fn broken(&self) -> Option<&EngineError> {
        self.broken.as_ref()
    }
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }
    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    /// The model on the backend (its configuration in `cfg`).
    pub fn model(&self) -> &Weights<B> {
        &self.weights
    }
    pub fn pool(&self) -> &BlockPool<B> {
        &self.pool
    }

    /// Numbers of a retention state, and of a window's key or value row, on this rank.
    pub fn state_widths(&self) -> (usize, usize) {
        let (heads, hd) = (self.weights.self_heads(), self.weights.cfg.self_head_dim());
        (heads * hd * hd, heads * hd)
    }

    fn fresh_caches(&self) -> Result<Caches<B>, EngineError> {
        let (per, _) = self.state_widths();
        let b = &self.backend;
        let states = self
            .weights
            .self_layers
            .iter()
            .map(|l| {
                Ok(match l.mixer {
                    layers::Mixer::Retention { .. } => State::Retention(b.zeros(per)?),
                    layers::Mixer::Window { .. } => State::Window { keys: b.zeros(0)?, values: b.zeros(0)?, rows: 0 },
                })
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        Ok(Caches { pos: 0, states, kv: KvShard::new(self.cp_size()) })
    }

    fn check_new(&self, id: SeqId) -> Result<(), EngineError> {
        if self.seqs.contains_key(&id) {
            return Err(EngineError::DuplicateSequence(id));
        }
        match self.opts.max_sequences {
            max if max > 0 && self.seqs.len() >= max => Err(EngineError::TooManySequences(max)),
            _ => Ok(()),
        }
    }

    pub fn add_sequence(&mut self, id: SeqId) -> Result<(), EngineError> {
        self.check_new(id)?;
        self.backend.bind()?;
        let caches = self.fresh_caches()?;
        self.seqs.insert(id, caches);
        Ok(())
    }

    /// A new sequence that continues from snapshot `from`: it shares the snapshot's cache blocks
    /// and starts with a copy of its self-decoder state, so its next token is at the snapshot's
    /// position.
    pub fn add_sequence_from(&mut self, id: SeqId, from: SnapshotId) -> Result<(), EngineError> {
        self.check_new(id)?;
        self.backend.bind()?;
        let (per, width) = self.state_widths();
        let snap = self.snapshots.get(&from).ok_or(EngineError::UnknownSnapshot(from))?;
        let caches = snap.share(&self.backend, &mut self.pool, per, width)?;
        self.seqs.insert(id, caches);
        Ok(())
    }

    /// Saves sequence `seq` as it is now under `id` (replacing an older snapshot of that id).
    /// The snapshot shares the sequence's cache blocks; only the self-decoder state is copied.
    pub fn snapshot(&mut self, seq: SeqId, id: SnapshotId) -> Result<(), EngineError> {
        self.backend.bind()?;
        let (per, width) = self.state_widths();
        let s = self.seqs.get(&seq).ok_or(EngineError::UnknownSequence(seq))?;
        let snap = s.share(&self.backend, &mut self.pool, per, width)?;
        if let Some(mut old) = self.snapshots.insert(id, snap) {
            self.pool.free(&mut old.kv);
        }
        Ok(())
    }

    /// Drops a snapshot; its blocks go back to the pool unless sequences still share them.
    pub fn drop_snapshot(&mut self, id: SnapshotId) -> bool {
        self.bind_to_free();
        match self.snapshots.remove(&id) {
            Some(mut snap) => {
                self.pool.free(&mut snap.kv);
                true
            }
            None => false,
        }
    }

    /// Snapshots held, and the bytes of self-decoder state they copy.
    pub fn snapshot_usage(&self) -> (usize, usize) {
        let (per, width) = self.state_widths();
        let bytes = self.snapshots.values().flat_map(|s| &s.states).map(|s| s.bytes(per, width)).sum();
        (self.snapshots.len(), bytes)
    }

    /// The position a snapshot resumes at.
    pub fn snapshot_len(&self, id: SnapshotId) -> Option<usize> {
        self.snapshots.get(&id).map(|s| s.pos)
    }

    /// Frees a sequence and its cache blocks; false if it did not exist.
    pub fn free_sequence(&mut self, id: SeqId) -> bool {
        self.bind_to_free();
        match self.seqs.remove(&id) {
            Some(mut seq) => {
                self.pool.free(&mut seq.kv);
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
        self.seqs.get(&id).map(|s| s.kv.table.len() * self.pool.block_bytes())
    }

    /// Bytes of self-decoder state a sequence holds (constant in its length).
    pub fn sequence_state_bytes(&self, id: SeqId) -> Option<usize> {
        let (per, width) = self.state_widths();
        self.seqs.get(&id).map(|s| s.states.iter().map(|st| st.bytes(per, width)).sum())
    }

    /// This rank's global-cache rows of a sequence (its shard).
    pub fn sequence_shard_len(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.kv.rows)
    }

    /// Advances every item's sequence by its tokens. On an error before any collective (a bad
    /// item, a cache budget exhausted on any rank), no sequence changes on any rank. A failed
    /// collective or backend op leaves the rank broken: every later step fails with it.
    ///
    /// On the CPU the step runs on the engine's own thread pool. A decode step opens a parallel
    /// region per product and per attention layer, dozens a token; each one opened from a
    /// thread outside the pool hands its work over and sleeps until a worker wakes and finishes
    /// it, about 10 µs on this project's 2-core machines, where a region opened on a worker
    /// thread starts at once (a 256 × 256 one-row product: 10–14 µs against 3–3.6 µs). The
    /// pool is the engine's, not rayon's global one, because a step may block in a collective:
    /// ranks of one process sharing the global workers could each hold one while waiting for
    /// another's step that no free worker is left to run.
    pub fn step(&mut self, items: &[StepItem]) -> Result<Vec<StepOutput>, EngineError> {
        match self.threads.clone() {
            Some(threads) => {
                // The caller's subscriber and span (a request's, a bench's) stay those of the
                // step's spans and events on the pool's threads.
                let (dispatch, span) = (tracing::dispatcher::get_default(|d| d.clone()), tracing::Span::current());
                threads.install(|| {
                    tracing::dispatcher::with_default(&dispatch, || span.in_scope(|| self.step_here(items)))
                })
            }
            None => self.step_here(items),
        }
    }

    fn step_here(&mut self, items: &[StepItem]) -> Result<Vec<StepOutput>, EngineError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        self.validate(items)?;
        self.backend.bind()?;
        let mut seqs: Vec<Caches<B>> = items.iter().map(|it| self.seqs.remove(&it.seq).expect("validated")).collect();
        let placed: Vec<Placed> = items.iter().zip(&seqs).map(|(it, seq)| self.place(it, seq)).collect();
        let rank = self.cp_rank();
        let mine: Vec<usize> = placed.iter().map(|p| p.owners.iter().filter(|&&o| o == rank).count()).collect();
        let mut kvs: Vec<&mut KvShard> = seqs.iter_mut().map(|s| &mut s.kv).collect();
        let reserved = self.pool.reserve(&self.backend, &mut kvs, &mine).map_err(EngineError::from);
        let result = self.agree(reserved).and_then(|()| self.forward(items, &placed, &mut seqs));
        if let Err(e) = &result {
            if matches!(e, EngineError::Comm(_) | EngineError::Backend(_)) {
                tracing::error!(error = %e, "step failed mid-way: this rank is broken until its group is re-formed");
                self.broken = Some(e.clone());
            }
            for seq in &mut seqs {
                self.pool.trim(&mut seq.kv);
            }
        }
        for (it, seq) in items.iter().zip(seqs) {
            self.seqs.insert(it.seq, seq);
        }
        result
    }

    fn validate(&self, items: &[StepItem]) -> Result<(), EngineError> {
        let vocab = self.weights.cfg.vocab_size;
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

    fn place(&self, it: &StepItem, seq: &Caches<B>) -> Placed {
        let (rank, world, n) = (self.cp_rank(), self.cp_size(), it.tokens.len());
        match &it.placement {
            Placement::Sharded(starts) => {
                let starts = starts.clone().unwrap_or_else(|| even_split(n, world));
                let chunk_lens: Vec<usize> = (0..world).map(|r| chunk(&starts, n, r).len()).collect();
                let owners = (0..world).flat_map(|r| std::iter::repeat_n(r, chunk_lens[r])).collect();
                Placed { rows: chunk(&starts, n, rank), shard: Some(Shard { rank, chunk_lens }), owners }
            }
            Placement::Replicated => {
                let mut lens = seq.kv.lens.clone();
                let owners = (0..n)
                    .map(|_| {
                        let owner = crate::plan::decode_owner(&lens);
                        lens[owner] += 1;
                        owner
                    })
                    .collect();
                Placed { rows: 0..n, shard: None, owners }
            }
        }
    }

    /// Every rank says whether it can take the step; all go ahead only if all can.
    fn agree(&mut self, local: Result<(), EngineError>) -> Result<(), EngineError> {
        if self.world() == 1 {
            return local;
        }
        let flags = self.grid.all().all_gather(&[if local.is_err() { 1.0 } else { 0.0 }])?;
        if let Err(e) = local {
            tracing::warn!(error = %e, "this rank refuses the step: every rank of the group refuses it");
            return Err(e);
        }
        match flags.iter().position(|f| f.first() != Some(&0.0)) {
            Some(rank) => Err(EngineError::PeerRefused { rank, reason: "it refused the step (see its log)".into() }),
            None => Ok(()),
        }
    }

    fn forward(
        &mut self,
        items: &[StepItem],
        placed: &[Placed],
        seqs: &mut [Caches<B>],
    ) -> Result<Vec<StepOutput>, EngineError> {
        let (b, w) = (&self.backend, &self.weights);
        let rank = self.grid.cp_rank();
        let dim = w.cfg.dim;
        let mut segments = Vec::with_capacity(items.len());
        let mut positions: Vec<u32> = Vec::new();
        let mut tokens = Vec::new();
        for ((it, p), seq) in items.iter().zip(placed).zip(seqs.iter()) {
            let start = tokens.len();
            tokens.extend_from_slice(&it.tokens[p.rows.clone()]);
            positions.extend((seq.pos + p.rows.start..seq.pos + p.rows.end).map(|p| p as u32));
            segments.push(Segment { rows: start..tokens.len(), shard: p.shard.clone() });
        }
        let n = tokens.len();
        let _span = tracing::debug_span!("step", items = items.len(), rows = n).entered();
        // Every rank of a tensor-parallel row holds the same rows; a context-parallel rank whose
        // chunks are all empty computes nothing but takes part in every exchange.
        let (mut x, rope) = if n > 0 {
            (w.embed.forward(b, &tokens, dim, &mut self.grid)?, Some(b.rope_table(&w.rope_self, &positions)?))
        } else {
            (b.zeros(0)?, None)
        };
        for layer in 0..w.self_layers.len() {
            let mut states: Vec<&mut State<B>> = seqs.iter_mut().map(|s| &mut s.states[layer]).collect();
            w.self_layer(b, layer, &mut x, n, &segments, &mut states, rope.as_ref(), &mut self.grid)?;
        }
        let kvd = w.kv_dim();
        let kv = if n > 0 { Some(w.kv_rows(b, &x, n, &positions)?) } else { None };
        for (((it, seg), p), seq) in items.iter().zip(&segments).zip(placed).zip(seqs.iter_mut()) {
            if let Some((k, v)) = &kv {
                // This rank's rows of the item that it keeps, in runs of consecutive rows.
                let keep: Vec<usize> = (0..seg.rows.len()).filter(|&i| p.owners[p.rows.start + i] == rank).collect();
                for run in keep.chunk_by(|a, b| a + 1 == *b) {
                    let rows = seg.rows.start + run[0]..seg.rows.start + run[run.len() - 1] + 1;
                    let (ks, vs) = (rows_of(b, k, kvd, rows.clone(), n)?, rows_of(b, v, kvd, rows.clone(), n)?);
                    b.kv_write(&mut self.pool.storage, &seq.kv.table, seq.kv.rows, &ks, &vs, rows.len())?;
                    seq.kv.push(seq.pos + p.rows.start + run[0], rows.len());
                }
            }
            seq.pos += it.tokens.len();
            for &owner in &p.owners {
                seq.kv.lens[owner] += 1;
            }
        }

        // Early exit: only rows whose logits are wanted enter the cross-decoder, and every rank
        // runs it on the same rows (gathered from the ranks that hold them).
        let wanted: Vec<std::ops::Range<usize>> = items.iter().map(wanted_rows).collect();
        let mut local_rows = Vec::new();
        for ((want, seg), p) in wanted.iter().zip(&segments).zip(placed) {
            let mine = want.start.max(p.rows.start)..want.end.min(p.rows.end);
            if p.shard.is_some() && !mine.is_empty() {
                let r = seg.rows.start + mine.start - p.rows.start..seg.rows.start + mine.end - p.rows.start;
                local_rows.extend(b.download_owned(b.rows(&x, dim, r)?)?);
            }
        }
        let gathered = if self.grid.cp_size() > 1 && placed.iter().any(|p| p.shard.is_some()) {
            self.grid.cp().all_gather(&local_rows)?
        } else {
            vec![local_rows]
        };
        let mut offsets = vec![0usize; gathered.len()];
        let mut rows_x = Vec::new();
        let mut rows_pos = Vec::new();
        let mut rows_seq = Vec::new();
        for (i, ((want, seg), (p, (it, seq)))) in
            wanted.iter().zip(&segments).zip(placed.iter().zip(items.iter().zip(seqs.iter()))).enumerate()
        {
            if want.is_empty() {
                continue;
            }
            let first_pos = seq.pos - it.tokens.len();
            match &p.shard {
                // Rows cut across ranks come from the gathered buffers, in rank order.
                Some(_) => {
                    for t in want.clone() {
                        let owner = p.owners[t];
                        let off = offsets[owner];
                        offsets[owner] += dim;
                        let row = gathered[owner].get(off..off + dim).ok_or(CommError::Protocol {
                            peer: owner,
                            reason: "fewer cross-decoder rows than the plan says".into(),
                        })?;
                        rows_x.extend_from_slice(row);
                    }
                }
                None => {
                    let r = seg.rows.start + want.start..seg.rows.start + want.end;
                    rows_x.extend(b.download_owned(b.rows(&x, dim, r)?)?);
                }
            }
            rows_pos.extend((first_pos + want.start..first_pos + want.end).map(|p| p as u32));
            rows_seq.extend(std::iter::repeat_n(i, want.len()));
        }
        let logits = if rows_pos.is_empty() {
            Vec::new()
        } else {
            let visible: Vec<usize> =
                rows_seq.iter().zip(&rows_pos).map(|(&i, &pos)| seqs[i].kv.rows_upto(pos as usize)).collect();
            let tables = rows_seq
                .iter()
                .zip(&visible)
                .map(|(&i, &len)| b.block_table(&self.pool.storage, &seqs[i].kv.table, len))
                .collect::<Result<Vec<_>, _>>()?;
            // Row groups on a lone rank only: a group runs each layer's collectives in one order.
            let groups = if self.grid.world() == 1 {
                let row_bytes = 2 * kvd * self.pool.dtype().bytes();
                let bytes: Vec<usize> = visible.iter().map(|&len| len * row_bytes).collect();
                b.row_groups(&bytes, self.opts.cache_reuse_bytes)
            } else {
                None
            };
            let rows = CrossRows { positions: &rows_pos, tables: &tables, visible: &visible };
            let x = w.cross_decode(b, b.upload_owned(rows_x)?, &rows, &self.pool.storage, groups, &mut self.grid)?;
            // The last step's buffer, if its outputs have all been dropped.
            let buf = self.last_logits.take().and_then(|l| Arc::try_unwrap(l).ok()).unwrap_or_default();
            w.logits(b, &x, rows_pos.len(), &mut self.grid, buf)?
        };
        let vocab = w.cfg.vocab_size;
        let step = Arc::new(logits);
        if step.len() <= RECYCLE_LOGITS_ROWS * vocab {
            self.last_logits = Some(Arc::clone(&step));
        }
        let mut start = 0;
        Ok(items
            .iter()
            .zip(wanted)
            .map(|(it, want)| {
                let rows = start * vocab..(start + want.len()) * vocab;
                start += want.len();
                StepOutput { seq: it.seq, logits: ItemLogits { step: Arc::clone(&step), rows } }
            })
            .collect())
    }

    /// Broadcasts `data` from `root` to every rank of the group.
    pub fn broadcast(&mut self, root: usize, data: &mut Vec<f32>) -> Result<(), EngineError> {
        if let Err(e) = self.grid.all().broadcast(root, data) {
            self.broken = Some(EngineError::Comm(e.clone()));
            return Err(e.into());
        }
        Ok(())
    }

    /// Gives every sequence's and snapshot's blocks back, e.g. when a broken group is re-formed.
    pub fn clear(&mut self) {
        self.bind_to_free();
        for (_, mut seq) in self.seqs.drain() {
            self.pool.free(&mut seq.kv);
        }
        for (_, mut snap) in self.snapshots.drain() {
            self.pool.free(&mut snap.kv);
        }
    }
}

/// A pool of as many threads as the global one (`--threads`), or `None` (with a warning: the
/// steps then run on the calling thread and the global pool, only slower) where the OS refuses
/// threads.
fn engine_threads() -> Option<Arc<rayon::ThreadPool>> {
    let n = rayon::current_num_threads();
    match rayon::ThreadPoolBuilder::new().num_threads(n).thread_name(|i| format!("yoco-engine-{i}")).build() {
        Ok(pool) => Some(Arc::new(pool)),
        Err(e) => {
            tracing::warn!("no thread pool for the engine ({e}): steps run from the calling thread");
            None
        }
    }
}

impl From<ReserveError> for EngineError {
    fn from(e: ReserveError) -> Self {
        match e {
            ReserveError::Cache(e) => EngineError::Cache(e),
            ReserveError::Backend(e) => EngineError::Backend(e),
        }
    }
}

impl<B: Backend> Engine<B> {
    /// Binds the device before buffers are dropped: a failure is logged, as freeing cannot fail
    /// its caller (the buffers are then freed wherever the device lets them).
    fn bind_to_free(&self) {
        if let Err(e) = self.backend.bind() {
            tracing::warn!(error = %e, "cannot bind the device to free its buffers");
        }
    }
}

impl<B: Backend> Drop for Engine<B> {
    /// The weights, caches and states are freed on the thread that drops the engine (a new
    /// LoadModel's), which must have the device bound, or the device memory leaks.
    fn drop(&mut self) {
        self.bind_to_free();
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
