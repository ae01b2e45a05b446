//! The YOCO forward pass over any [`Backend`], for one rank holding the whole model: prompts
//! prefill through the self-decoder in chunks (each chunk's K/V projected into the global cache),
//! and only the last token of a prompt enters the cross-decoder (every token's does when all
//! logits are asked for: prompt log-probabilities). Decode runs a batch of sequences, one token
//! each, through every product as one matrix of rows; the mixers and cross-attention run per
//! sequence, over its own states and cache. Cache blocks are reference-counted, so that a
//! prefix-cache [`Snapshot`] shares the blocks of the sequence it was taken from. The order of operations is the
//! CPU engine's (`crate::model`): with f32 weights both compute the same numbers to rounding
//! (the CUDA backend's products with bf16/f16 weights also round the activations to the
//! weights' type, as cuBLAS takes them).

use std::ops::Range;

use super::{Backend, BackendError};
use crate::comm::{Collective, CommError, Timed};
use crate::config::ModelConfig;
use crate::engine::Logits;
use crate::kernels::cross_attention::CrossShape;
use crate::kernels::kv_block::CacheDtype;
use crate::kernels::rope::Rope;
use crate::model::{Linear, Model, SelfMixer};

mod caches;
mod sharded;

use caches::State;
pub use caches::{Sequence, Snapshot};

/// The gate logit normaliser of gated retention (as `crate::model`).
const GATE_LOGIT_NORMALIZER: f32 = 16.0;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("the global KV cache is full: {needed} more blocks needed, {free} free")]
    CacheFull { needed: usize, free: usize },
    #[error("token {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("an empty prompt")]
    Empty,
    #[error("all {0} sequence slots are in use (ForwardOptions::max_sequences)")]
    NoFreeSlot(usize),
    #[error("{0}")]
    Unsupported(String),
    #[error("a step item needs at least one sequence")]
    EmptyBatch,
    #[error("unknown sequence {0}")]
    UnknownSequence(crate::engine::SeqId),
    #[error("sequence {0} already exists")]
    DuplicateSequence(crate::engine::SeqId),
    #[error("sequence {0} appears twice in one step")]
    SequenceTwiceInStep(crate::engine::SeqId),
    #[error("unknown prefix-cache snapshot {0}")]
    UnknownSnapshot(crate::engine::SnapshotId),
    #[error("{0}")]
    BadSplit(String),
    #[error("rank {rank} cannot take this step: {reason}")]
    PeerRefused { rank: usize, reason: String },
    #[error("collective failed, the group must be re-formed: {0}")]
    Comm(#[from] CommError),
}

pub type Result<T> = std::result::Result<T, ForwardError>;

/// How the forward pass keeps its cache and cuts its prompts.
#[derive(Debug, Clone)]
pub struct ForwardOptions {
    pub cache_dtype: CacheDtype,
    /// Positions per cache block.
    pub block_tokens: usize,
    /// Positions the cache pool holds, over all sequences (allocated at start-up).
    pub cache_tokens: usize,
    /// Prompt tokens per self-decoder chunk: a multiple of the retention block (64), so that
    /// chunking changes nothing in the numbers.
    pub chunk_tokens: usize,
    /// Sequences that may be open at once: the retention states of that many are allocated at
    /// start-up, one slot each.
    pub max_sequences: usize,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        ForwardOptions {
            cache_dtype: CacheDtype::F32,
            block_tokens: 256,
            cache_tokens: 1 << 16,
            chunk_tokens: 4096,
            max_sequences: 16,
        }
    }
}

struct Lin<B: Backend> {
    w: B::Matrix,
}

struct Ffn<B: Backend> {
    fc1: Lin<B>,
    gate: Lin<B>,
    fc2: Lin<B>,
}

enum Mixer<B: Backend> {
    Retention { q: Lin<B>, k: Lin<B>, v: Lin<B>, g: Lin<B>, gt: Lin<B>, out: Lin<B> },
    Window { q: Lin<B>, k: Lin<B>, v: Lin<B>, out: Lin<B>, window: usize },
}

struct SelfLayer<B: Backend> {
    norm: B::Buf,
    mixer: Mixer<B>,
    final_norm: B::Buf,
    ffn: Ffn<B>,
}

struct CrossLayer<B: Backend> {
    norm: B::Buf,
    q: Lin<B>,
    out: Lin<B>,
    final_norm: B::Buf,
    ffn: Ffn<B>,
}

pub struct Forward<B: Backend> {
    backend: B,
    cfg: ModelConfig,
    opts: ForwardOptions,
    embed: B::Matrix,
    self_layers: Vec<SelfLayer<B>>,
    kv_norm: B::Buf,
    k_proj: Lin<B>,
    v_proj: Lin<B>,
    cross_layers: Vec<CrossLayer<B>>,
    norm: B::Buf,
    /// `None` when tied to the embedding.
    output: Option<Lin<B>>,
    rope_self: Rope,
    rope_cross: Rope,
    pool: B::Pool,
    free_blocks: Vec<u32>,
    /// Holders of each block: sequences and snapshots (0: free).
    block_refs: Vec<u32>,
    /// Per self-decoder layer, for retention: `[max_sequences, heads, d, d]` states.
    state_pools: Vec<Option<B::Buf>>,
    free_slots: Vec<usize>,
    /// The other ranks of a context-parallel group (`None`: this rank alone).
    group: Option<Timed>,
    /// Set when a collective failed mid-step: this rank's state no longer matches its peers'.
    broken: Option<CommError>,
}

impl<B: Backend> Forward<B> {
    /// The model's weights on `backend`, and a cache pool of `opts.cache_tokens` positions.
    pub fn new(backend: B, model: &Model, opts: ForwardOptions) -> Result<Self> {
        if model.tp.size != 1 {
            return Err(ForwardError::Unsupported("the backend forward pass runs the whole model (tp = 1)".into()));
        }
        if opts.chunk_tokens == 0 || !opts.chunk_tokens.is_multiple_of(crate::kernels::retention::RETENTION_BLOCK) {
            return Err(ForwardError::Unsupported(format!(
                "chunk_tokens {} must be a positive multiple of {}",
                opts.chunk_tokens,
                crate::kernels::retention::RETENTION_BLOCK
            )));
        }
        if opts.block_tokens == 0 || opts.max_sequences == 0 {
            return Err(ForwardError::Unsupported("block_tokens and max_sequences must be positive".into()));
        }
        let b = &backend;
        let lin = |l: &Linear| -> Result<Lin<B>> { Ok(Lin { w: b.matrix(&l.weight)? }) };
        let vector = |t: &crate::weights::Tensor| -> Result<B::Buf> { Ok(b.upload(t.as_slice())?) };
        let ffn = |f: &crate::model::FeedForward| -> Result<Ffn<B>> {
            Ok(Ffn { fc1: lin(&f.fc1)?, gate: lin(&f.gate)?, fc2: lin(&f.fc2)? })
        };
        let self_layers = model
            .self_layers
            .iter()
            .map(|l| {
                let mixer = match &l.mixer {
                    SelfMixer::Retention { q_proj, k_proj, v_proj, g_proj, gt_proj, out_proj } => Mixer::Retention {
                        q: lin(q_proj)?,
                        k: lin(k_proj)?,
                        v: lin(v_proj)?,
                        g: lin(g_proj)?,
                        gt: lin(gt_proj)?,
                        out: lin(out_proj)?,
                    },
                    SelfMixer::Window { q_proj, k_proj, v_proj, out_proj, window } => Mixer::Window {
                        q: lin(q_proj)?,
                        k: lin(k_proj)?,
                        v: lin(v_proj)?,
                        out: lin(out_proj)?,
                        window: *window,
                    },
                };
                Ok(SelfLayer {
                    norm: vector(&l.mixer_layer_norm)?,
                    mixer,
                    final_norm: vector(&l.final_layer_norm)?,
                    ffn: ffn(&l.ffn)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let cross_layers = model
            .cross_layers
            .iter()
            .map(|l| {
                Ok(CrossLayer {
                    norm: vector(&l.mixer_layer_norm)?,
                    q: lin(&l.q_proj)?,
                    out: lin(&l.out_proj)?,
                    final_norm: vector(&l.final_layer_norm)?,
                    ffn: ffn(&l.ffn)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let cfg = model.cfg.clone();
        let blocks = opts.cache_tokens.div_ceil(opts.block_tokens);
        let pool = b.kv_pool(opts.cache_dtype, blocks, opts.block_tokens, cfg.kv_dim())?;
        let state_len = cfg.n_self_heads * cfg.self_head_dim() * cfg.self_head_dim();
        let state_pools = self_layers
            .iter()
            .map(|l| match l.mixer {
                Mixer::Retention { .. } => b.zeros(opts.max_sequences * state_len).map(Some),
                Mixer::Window { .. } => Ok(None),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Forward {
            embed: b.matrix(&model.embed_tokens)?,
            self_layers,
            kv_norm: vector(&model.kv_layer_norm)?,
            k_proj: lin(&model.k_proj)?,
            v_proj: lin(&model.v_proj)?,
            cross_layers,
            norm: vector(&model.layer_norm)?,
            output: model.output_projection.as_ref().map(lin).transpose()?,
            rope_self: Rope::new(cfg.rope_theta, cfg.self_head_dim()),
            rope_cross: Rope::new(cfg.rope_theta, cfg.head_dim()),
            free_blocks: (0..blocks as u32).rev().collect(),
            block_refs: vec![0; blocks],
            state_pools,
            free_slots: (0..opts.max_sequences).rev().collect(),
            group: None,
            broken: None,
            pool,
            cfg,
            opts,
            backend,
        })
    }

    /// One rank of a context-parallel group whose ranks talk through `comm`: each holds the
    /// whole model and its shard of every sequence's global cache. Every rank must be given
    /// the same calls in the same order (SPMD), as the CPU engine's ranks are.
    pub fn with_group(backend: B, model: &Model, opts: ForwardOptions, comm: Box<dyn Collective>) -> Result<Self> {
        let mut fwd = Self::new(backend, model, opts)?;
        if comm.world() > 1 {
            fwd.group = Some(Timed::new(comm));
        }
        Ok(fwd)
    }

    /// This rank in its group.
    pub fn rank(&self) -> usize {
        self.group.as_ref().map_or(0, |g| g.rank())
    }

    /// Ranks of the group (each holds a shard of every global cache).
    pub fn world(&self) -> usize {
        self.group.as_ref().map_or(1, |g| g.world())
    }

    /// Time spent exchanging with the other ranks (waiting for them included) since the last
    /// call.
    pub fn take_collective_time(&mut self) -> std::time::Duration {
        self.group.as_mut().map_or(std::time::Duration::ZERO, Timed::take_spent)
    }

    /// The collective failure that broke this rank's group, if any.
    pub fn broken(&self) -> Option<&CommError> {
        self.broken.as_ref()
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend back, the model's weights and the cache pool released.
    pub fn into_backend(self) -> B {
        self.backend
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Bytes of global cache per position of context (K and V of every KV head).
    pub fn cache_bytes_per_token(&self) -> usize {
        2 * self.cfg.kv_dim() * self.opts.cache_dtype.bytes()
    }

    /// Cache blocks not held by any sequence or snapshot.
    pub fn free_blocks(&self) -> usize {
        self.free_blocks.len()
    }

    /// Positions the cache pool holds.
    pub fn capacity_tokens(&self) -> usize {
        self.block_refs.len() * self.opts.block_tokens
    }

    /// Bytes of the cache pool held by sequences and snapshots.
    pub fn used_cache_bytes(&self) -> usize {
        (self.block_refs.len() - self.free_blocks.len()) * self.opts.block_tokens * self.cache_bytes_per_token()
    }

    pub fn options(&self) -> &ForwardOptions {
        &self.opts
    }

    /// Sequences open now (each holds a state slot).
    pub fn open_sequences(&self) -> usize {
        self.opts.max_sequences - self.free_slots.len()
    }

    /// Every rank says whether it can go on; all go on only if all can (a lone rank: its own
    /// answer). Errors before any exchange thus leave every rank as it was.
    pub(crate) fn agree(&mut self, local: Result<()>) -> Result<()> {
        let Some(group) = self.group.as_mut() else { return local };
        let flags = match group.all_gather(&[if local.is_err() { 1.0 } else { 0.0 }]) {
            Ok(flags) => flags,
            Err(e) => return Err(self.fail(e)),
        };
        if let Err(e) = local {
            tracing::warn!(error = %e, "this rank refuses the step: every rank of the group refuses it");
            return Err(e);
        }
        match flags.iter().position(|f| f.first() != Some(&0.0)) {
            Some(rank) => {
                tracing::warn!(peer = rank, "a peer refused the step: this rank refuses it too");
                Err(ForwardError::PeerRefused { rank, reason: "it refused the step (see its log)".into() })
            }
            None => Ok(()),
        }
    }

    /// Marks the group broken by a failed collective.
    fn fail(&mut self, e: CommError) -> ForwardError {
        self.broken = Some(e.clone());
        ForwardError::Comm(e)
    }

    fn check_group(&self) -> Result<()> {
        match &self.broken {
            Some(e) => Err(ForwardError::Comm(e.clone())),
            None => Ok(()),
        }
    }

    /// Replaces `data` on every rank by rank 0's (nothing on a lone rank).
    pub fn broadcast_from_first(&mut self, data: &mut Vec<f32>) -> Result<()> {
        self.check_group()?;
        let Some(group) = self.group.as_mut() else { return Ok(()) };
        if let Err(e) = group.broadcast(0, data) {
            return Err(self.fail(e));
        }
        Ok(())
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        match tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            Some(&token) => Err(ForwardError::TokenOutOfRange { token, vocab: self.cfg.vocab_size }),
            None => Ok(()),
        }
    }

    /// Runs `tokens` (a prompt, or the next generated token) through the model after what
    /// `seq` has seen, in chunks of `chunk_tokens`; returns the logits of the last token.
    pub fn forward(&mut self, seq: &mut Sequence<B>, tokens: &[u32]) -> Result<Vec<f32>> {
        self.prefill(seq, tokens, None, Logits::Last)
    }

    /// [`Forward::forward`], with the logits after every one of `tokens`, `[n, vocab]`: the
    /// cross-decoder runs for each position, over the cache up to it (prompt log-probabilities).
    pub fn forward_all(&mut self, seq: &mut Sequence<B>, tokens: &[u32]) -> Result<Vec<f32>> {
        self.prefill(seq, tokens, None, Logits::All)
    }

    /// [`Forward::forward`] without the logits: a prompt chunk that is not the last only fills
    /// the caches (the cross-decoder is skipped: YOCO's linear prefill).
    pub fn extend(&mut self, seq: &mut Sequence<B>, tokens: &[u32]) -> Result<()> {
        self.prefill(seq, tokens, None, Logits::None).map(drop)
    }

    /// Prompt tokens after what `seq` has seen, cut into one contiguous chunk per rank of the
    /// group (at `starts`, or evenly): each rank runs the self-decoder on its chunk, exchanging
    /// retention states and window halos with the others, and keeps its chunk's K/V, its shard
    /// of the global cache. Returns the logits `logits` asks for, `[rows, vocab]`, the same on
    /// every rank: the cross-decoder runs on every rank over its shard, the partial attentions
    /// merged. A lone rank runs its tokens in chunks of `chunk_tokens`; a group's rank runs its
    /// chunk at once (the coordinator bounds it). Bad input, or a cache full on any rank,
    /// changes nothing on any rank.
    pub fn prefill(
        &mut self,
        seq: &mut Sequence<B>,
        tokens: &[u32],
        starts: Option<&[usize]>,
        logits: Logits,
    ) -> Result<Vec<f32>> {
        self.check_group()?;
        if tokens.is_empty() {
            return Err(ForwardError::Empty);
        }
        self.check_tokens(tokens)?;
        let (n, world) = (tokens.len(), self.world());
        let starts = match starts {
            Some(s) => {
                crate::cp::validate_split(s, n, world).map_err(ForwardError::BadSplit)?;
                s.to_vec()
            }
            None => crate::cp::even_split(n, world),
        };
        let mine = crate::cp::chunk(&starts, n, self.rank());
        let reserved = self.reserve(&mut [&mut *seq], &[mine.len()]);
        if let Err(e) = self.agree(reserved) {
            self.trim(seq);
            return Err(e);
        }
        let first = seq.pos;
        let wanted = match logits {
            Logits::None => n..n,
            Logits::Last => n - 1..n,
            Logits::All => 0..n,
        };
        let x = if world == 1 {
            self.run_self_decoder(seq, tokens, wanted.clone())?
        } else {
            self.self_decode_sharded(seq, tokens, &starts, wanted.clone())?
        };
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(&[u32], usize, usize)> =
            wanted.map(|t| (&seq.table[..], seq.shard.rows_upto(first + t), first + t)).collect();
        self.cross_decode(&x, &rows)
    }

    /// One decode step for a batch: `tokens[i]` after what `seqs[i]` has seen. The products run
    /// once over all rows (each weight read once per step, not once per sequence). Returns the
    /// logits `[n, vocab]`, row i of sequence i. In a group every rank runs the same batch, and
    /// each token's K/V is kept by the rank with its sequence's smallest shard. A token outside
    /// the vocabulary or a full cache changes nothing.
    pub fn decode(&mut self, seqs: &mut [&mut Sequence<B>], tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_group()?;
        if seqs.is_empty() {
            return Err(ForwardError::EmptyBatch);
        }
        assert_eq!(seqs.len(), tokens.len(), "one token per sequence");
        self.check_tokens(tokens)?;
        let rank = self.rank();
        let owners: Vec<usize> = seqs.iter().map(|s| s.shard.decode_owner()).collect();
        let rows: Vec<usize> = owners.iter().map(|&o| usize::from(o == rank)).collect();
        let reserved = self.reserve(seqs, &rows);
        if let Err(e) = self.agree(reserved) {
            for s in seqs.iter_mut() {
                self.trim(s);
            }
            return Err(e);
        }
        let x = self.self_decode_batch(seqs, tokens, &owners)?;
        let rows: Vec<(&[u32], usize, usize)> = seqs.iter().map(|s| (&s.table[..], s.shard.rows, s.pos - 1)).collect();
        self.cross_decode(&x, &rows)
    }

    /// A lone rank's self-decoder over `tokens` in chunks (blocks reserved), caches advanced;
    /// its output rows `wanted` (none: an empty buffer).
    fn run_self_decoder(&mut self, seq: &mut Sequence<B>, tokens: &[u32], wanted: Range<usize>) -> Result<B::Buf> {
        let dim = self.cfg.dim;
        let mut out = self.backend.zeros(wanted.len() * dim)?;
        for (i, chunk) in tokens.chunks(self.opts.chunk_tokens).enumerate() {
            let x = self.self_decode(seq, chunk)?;
            let at = i * self.opts.chunk_tokens;
            let (lo, hi) = (wanted.start.max(at), wanted.end.min(at + chunk.len()));
            if lo < hi {
                let rows = self.backend.rows(&x, dim, lo - at..hi - at)?;
                self.backend.write_rows(&mut out, dim, lo - wanted.start, &rows, hi - lo)?;
            }
        }
        Ok(out)
    }

    /// Greedy generation: the prompt, then `n` tokens each chosen as the argmax of the last
    /// logits. Returns the tokens and the logits each was chosen from.
    pub fn generate_greedy(
        &mut self,
        seq: &mut Sequence<B>,
        prompt: &[u32],
        n: usize,
    ) -> Result<(Vec<u32>, Vec<Vec<f32>>)> {
        let mut logits = self.forward(seq, prompt)?;
        let (mut tokens, mut all) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            let next = crate::sampling::argmax(&logits);
            tokens.push(next);
            all.push(logits);
            if i + 1 == n {
                break;
            }
            logits = self.decode(&mut [&mut *seq], &[next])?;
        }
        Ok((tokens, all))
    }

    /// The self-decoder over one chunk at the sequence's position (its blocks reserved), its
    /// K/V written into the global cache; returns the self-decoder's output rows.
    fn self_decode(&mut self, seq: &mut Sequence<B>, chunk: &[u32]) -> Result<B::Buf> {
        let b = &self.backend;
        let cfg = &self.cfg;
        let (n, dim, eps) = (chunk.len(), cfg.dim, cfg.norm_eps);
        let (heads, hd) = (cfg.n_self_heads, cfg.self_head_dim());
        let positions: Vec<u32> = (seq.pos..seq.pos + n).map(|p| p as u32).collect();
        // One table of self-decoder angles for every layer's q and k.
        let rope = b.rope_table(&self.rope_self, &positions)?;
        let mm = |x: &B::Buf, m: usize, l: &Lin<B>| b.matmul(x, m, &l.w);
        let mut x = b.embed(chunk, &self.embed, (dim as f32).sqrt())?;
        let slot = seq.slot;
        for ((l, state), pool) in self.self_layers.iter().zip(&mut seq.states).zip(&mut self.state_pools) {
            let xn = b.rms_norm(&x, n, dim, Some(&l.norm), eps)?;
            let mixed = match (&l.mixer, state) {
                (Mixer::Retention { q, k, v, g, gt, out }, State::Retention) => {
                    let states = pool.as_mut().expect("a retention layer has a state pool");
                    let (mut qh, mut kh, vh) = (mm(&xn, n, q)?, mm(&xn, n, k)?, mm(&xn, n, v)?);
                    b.rope(&mut qh, &rope, heads, hd)?;
                    b.rope(&mut kh, &rope, heads, hd)?;
                    let gamma = b.log_sigmoid_scaled(&mm(&xn, n, gt)?, n * heads, GATE_LOGIT_NORMALIZER)?;
                    let o = b.retention(&qh, &kh, &vh, &gamma, states, slot, n, heads, hd)?;
                    retention_out(b, &xn, o, n, heads, hd, eps, g, out)?
                }
                (Mixer::Window { q, k, v, out, window }, State::Window { keys, values, rows }) => {
                    let (mut qh, mut kh, vh) = (mm(&xn, n, q)?, mm(&xn, n, k)?, mm(&xn, n, v)?);
                    b.rope(&mut qh, &rope, heads, hd)?;
                    b.rope(&mut kh, &rope, heads, hd)?;
                    let o = window_step(b, &qh, &kh, &vh, n, (keys, values, rows), *window, heads, hd)?;
                    mm(&o, n, out)?
                }
                _ => unreachable!("each layer's state is made for its mixer"),
            };
            b.add_assign(&mut x, &mixed, n * dim)?;
            let ffn_out = ffn(b, &l.ffn, &b.rms_norm(&x, n, dim, Some(&l.final_norm), eps)?, n, cfg.hidden_dim)?;
            b.add_assign(&mut x, &ffn_out, n * dim)?;
        }
        // This chunk's rows of the global cache.
        let (k, v) = self.cache_rows(&x, n, &positions)?;
        self.backend.kv_write(&mut self.pool, &seq.table, seq.shard.rows, &k, &v, n)?;
        seq.shard.push(seq.pos, n);
        seq.shard.lens[0] += n;
        seq.pos += n;
        Ok(x)
    }

    /// The self-decoder for one token of each sequence (their blocks reserved): the products
    /// over all rows at once, each mixer over its sequence's state; token i's K/V kept by rank
    /// `owners[i]`. Returns the output rows.
    fn self_decode_batch(&mut self, seqs: &mut [&mut Sequence<B>], tokens: &[u32], owners: &[usize]) -> Result<B::Buf> {
        let b = &self.backend;
        let cfg = &self.cfg;
        let (n, dim, eps) = (tokens.len(), cfg.dim, cfg.norm_eps);
        let (heads, hd) = (cfg.n_self_heads, cfg.self_head_dim());
        let qd = heads * hd;
        let positions: Vec<u32> = seqs.iter().map(|s| s.pos as u32).collect();
        let rope = b.rope_table(&self.rope_self, &positions)?;
        let mm = |x: &B::Buf, m: usize, l: &Lin<B>| b.matmul(x, m, &l.w);
        let mut x = b.embed(tokens, &self.embed, (dim as f32).sqrt())?;
        for (li, (l, pool)) in self.self_layers.iter().zip(&mut self.state_pools).enumerate() {
            let xn = b.rms_norm(&x, n, dim, Some(&l.norm), eps)?;
            let mixed = match &l.mixer {
                Mixer::Retention { q, k, v, g, gt, out } => {
                    let states = pool.as_mut().expect("a retention layer has a state pool");
                    let (mut qh, mut kh, vh) = (mm(&xn, n, q)?, mm(&xn, n, k)?, mm(&xn, n, v)?);
                    b.rope(&mut qh, &rope, heads, hd)?;
                    b.rope(&mut kh, &rope, heads, hd)?;
                    let gamma = b.log_sigmoid_scaled(&mm(&xn, n, gt)?, n * heads, GATE_LOGIT_NORMALIZER)?;
                    let mut o = b.zeros(n * qd)?;
                    for (i, s) in seqs.iter().enumerate() {
                        let row = |t: &B::Buf, w: usize| b.rows(t, w, i..i + 1);
                        let (qi, ki, vi, gi) = (row(&qh, qd)?, row(&kh, qd)?, row(&vh, qd)?, row(&gamma, heads)?);
                        let oi = b.retention(&qi, &ki, &vi, &gi, states, s.slot, 1, heads, hd)?;
                        b.write_rows(&mut o, qd, i, &oi, 1)?;
                    }
                    retention_out(b, &xn, o, n, heads, hd, eps, g, out)?
                }
                Mixer::Window { q, k, v, out, window } => {
                    let (mut qh, mut kh, vh) = (mm(&xn, n, q)?, mm(&xn, n, k)?, mm(&xn, n, v)?);
                    b.rope(&mut qh, &rope, heads, hd)?;
                    b.rope(&mut kh, &rope, heads, hd)?;
                    let mut o = b.zeros(n * qd)?;
                    for (i, s) in seqs.iter_mut().enumerate() {
                        let State::Window { keys, values, rows } = &mut s.states[li] else {
                            unreachable!("each layer's state is made for its mixer")
                        };
                        let row = |t: &B::Buf| b.rows(t, qd, i..i + 1);
                        let (qi, ki, vi) = (row(&qh)?, row(&kh)?, row(&vh)?);
                        let oi = window_step(b, &qi, &ki, &vi, 1, (keys, values, rows), *window, heads, hd)?;
                        b.write_rows(&mut o, qd, i, &oi, 1)?;
                    }
                    mm(&o, n, out)?
                }
            };
            b.add_assign(&mut x, &mixed, n * dim)?;
            let ffn_out = ffn(b, &l.ffn, &b.rms_norm(&x, n, dim, Some(&l.final_norm), eps)?, n, cfg.hidden_dim)?;
            b.add_assign(&mut x, &ffn_out, n * dim)?;
        }
        let (k, v) = self.cache_rows(&x, n, &positions)?;
        let kvd = self.cfg.kv_dim();
        let rank = self.rank();
        for ((i, s), &owner) in seqs.iter_mut().enumerate().zip(owners) {
            if owner == rank {
                let (ki, vi) = (self.backend.rows(&k, kvd, i..i + 1)?, self.backend.rows(&v, kvd, i..i + 1)?);
                self.backend.kv_write(&mut self.pool, &s.table, s.shard.rows, &ki, &vi, 1)?;
                s.shard.push(s.pos, 1);
            }
            s.shard.lens[owner] += 1;
            s.pos += 1;
        }
        Ok(x)
    }

    /// The global cache's K (rotated) and V rows for self-decoder output rows `x` at `positions`.
    fn cache_rows(&self, x: &B::Buf, n: usize, positions: &[u32]) -> Result<(B::Buf, B::Buf)> {
        let (b, cfg) = (&self.backend, &self.cfg);
        let xn = b.rms_norm(x, n, cfg.dim, Some(&self.kv_norm), cfg.norm_eps)?;
        let mut k = b.matmul(&xn, n, &self.k_proj.w)?;
        let v = b.matmul(&xn, n, &self.v_proj.w)?;
        b.rope(&mut k, &b.rope_table(&self.rope_cross, positions)?, cfg.n_attn_kv_heads, cfg.head_dim())?;
        Ok((k, v))
    }

    /// The cross-decoder for self-decoder output rows `x`: row i at position `rows[i].2`, over
    /// the first `rows[i].1` rows of this rank's shard of the cache whose blocks `rows[i].0`
    /// lists (in a group, merged with the other ranks' partials); then the final norm and the
    /// output projection. Returns the logits `[rows, vocab]`.
    fn cross_decode(&mut self, x: &B::Buf, rows: &[(&[u32], usize, usize)]) -> Result<Vec<f32>> {
        let result = self.cross_decode_rows(x, rows);
        self.broken_by(result)
    }

    /// `result`, the group marked broken if it is a failed collective.
    fn broken_by<T>(&mut self, result: Result<T>) -> Result<T> {
        if let Err(ForwardError::Comm(e)) = &result {
            self.broken = Some(e.clone());
        }
        result
    }

    fn cross_decode_rows(&mut self, x: &B::Buf, rows: &[(&[u32], usize, usize)]) -> Result<Vec<f32>> {
        let b = &self.backend;
        let cfg = &self.cfg;
        let (n, dim, eps) = (rows.len(), cfg.dim, cfg.norm_eps);
        let shape = CrossShape { heads: cfg.n_attn_heads, kv_heads: cfg.n_attn_kv_heads, head_dim: cfg.head_dim() };
        let positions: Vec<u32> = rows.iter().map(|&(_, _, pos)| pos as u32).collect();
        let visible: Vec<usize> = rows.iter().map(|&(_, len, _)| len).collect();
        let rope = b.rope_table(&self.rope_cross, &positions)?;
        // Each row's view of the cache, one for every cross-decoder layer.
        let tables = rows
            .iter()
            .map(|&(table, len, _)| b.block_table(&self.pool, table, len))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut x = b.rows(x, dim, 0..n)?;
        for l in &self.cross_layers {
            let xn = b.rms_norm(&x, n, dim, Some(&l.norm), eps)?;
            let mut q = b.matmul(&xn, n, &l.q.w)?;
            b.rope(&mut q, &rope, shape.heads, shape.head_dim)?;
            let o = if let Some(group) = self.group.as_mut() {
                sharded::attention_across_ranks(b, group, &q, &self.pool, &tables, &visible, shape)?
            } else {
                b.cross_attention_rows(&q, &self.pool, &tables, shape)?
            };
            b.add_assign(&mut x, &b.matmul(&o, n, &l.out.w)?, n * dim)?;
            let ffn_out = ffn(b, &l.ffn, &b.rms_norm(&x, n, dim, Some(&l.final_norm), eps)?, n, cfg.hidden_dim)?;
            b.add_assign(&mut x, &ffn_out, n * dim)?;
        }
        let xn = b.rms_norm(&x, n, dim, Some(&self.norm), eps)?;
        let logits = b.matmul(&xn, n, self.output.as_ref().map_or(&self.embed, |o| &o.w))?;
        Ok(b.download(&logits)?)
    }
}

/// The rest of a retention mixer after the retention itself (`o`, `[n, heads · d]`): subln
/// (RMSNorm over each head, no weight), the swish gate, the output projection.
#[allow(clippy::too_many_arguments)]
fn retention_out<B: Backend>(
    b: &B,
    xn: &B::Buf,
    o: B::Buf,
    n: usize,
    heads: usize,
    hd: usize,
    eps: f32,
    g: &Lin<B>,
    out: &Lin<B>,
) -> Result<B::Buf> {
    let normed = b.rms_norm(&o, n * heads, hd, None, eps)?;
    let mut gate = b.matmul(xn, n, &g.w)?;
    b.silu_mul(&mut gate, &normed, n * heads * hd)?;
    Ok(b.matmul(&gate, n, &out.w)?)
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

/// SwiGLU feed-forward: `fc2(silu(fc1 x) ⊙ gate x)` over n rows.
fn ffn<B: Backend>(b: &B, f: &Ffn<B>, x: &B::Buf, n: usize, hidden: usize) -> Result<B::Buf> {
    let mut a = b.matmul(x, n, &f.fc1.w)?;
    b.silu_mul(&mut a, &b.matmul(x, n, &f.gate.w)?, n * hidden)?;
    Ok(b.matmul(&a, n, &f.fc2.w)?)
}
