//! The YOCO forward pass over any [`Backend`], for one rank holding the whole model: prompts
//! prefill through the self-decoder in chunks (each chunk's K/V projected into the global cache),
//! and only the last token of a prompt enters the cross-decoder. The order of operations is the
//! CPU engine's (`crate::model`): with f32 weights both compute the same numbers to rounding
//! (the CUDA backend's products with bf16/f16 weights also round the activations to the
//! weights' type, as cuBLAS takes them).

use super::{Backend, BackendError};
use crate::config::ModelConfig;
use crate::kernels::cross_attention::CrossShape;
use crate::kernels::kv_block::CacheDtype;
use crate::kernels::rope::Rope;
use crate::model::{Linear, Model, SelfMixer};

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

/// One self-decoder layer's cache for one sequence, on the backend.
enum State<B: Backend> {
    /// In the layer's pool of states, at the sequence's slot.
    Retention,
    /// The last `rows` (≤ W−1) rotated keys and values.
    Window { keys: B::Buf, values: B::Buf, rows: usize },
}

/// A sequence's caches: the self-decoder's constant-size states and its blocks of the global
/// cache. Give it back with [`Forward::free`].
pub struct Sequence<B: Backend> {
    pos: usize,
    /// The sequence's slot in every retention layer's pool of states.
    slot: usize,
    states: Vec<State<B>>,
    table: Vec<u32>,
}

impl<B: Backend> Sequence<B> {
    /// Tokens seen so far.
    pub fn len(&self) -> usize {
        self.pos
    }
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }
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
    /// Per self-decoder layer, for retention: `[max_sequences, heads, d, d]` states.
    state_pools: Vec<Option<B::Buf>>,
    free_slots: Vec<usize>,
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
            state_pools,
            free_slots: (0..opts.max_sequences).rev().collect(),
            pool,
            cfg,
            opts,
            backend,
        })
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

    /// Cache blocks not held by any sequence.
    pub fn free_blocks(&self) -> usize {
        self.free_blocks.len()
    }

    /// A sequence with empty caches, in a free state slot.
    pub fn new_sequence(&mut self) -> Result<Sequence<B>> {
        let slot = *self.free_slots.last().ok_or(ForwardError::NoFreeSlot(self.opts.max_sequences))?;
        let per = self.cfg.n_self_heads * self.cfg.self_head_dim() * self.cfg.self_head_dim();
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
        Ok(Sequence { pos: 0, slot, states, table: Vec::new() })
    }

    /// Returns a sequence's cache blocks to the pool.
    pub fn free(&mut self, seq: Sequence<B>) {
        self.free_blocks.extend(seq.table.iter().rev());
        self.free_slots.push(seq.slot);
    }

    /// Runs `tokens` (a prompt, or the next generated token) through the model after what
    /// `seq` has seen, in chunks of `chunk_tokens`; returns the logits of the last token.
    pub fn forward(&mut self, seq: &mut Sequence<B>, tokens: &[u32]) -> Result<Vec<f32>> {
        let x = self.run_self_decoder(seq, tokens)?;
        self.cross_decode(seq, &x)
    }

    /// [`Forward::forward`] without the logits: a prompt chunk that is not the last only fills
    /// the caches (the cross-decoder is skipped: YOCO's linear prefill).
    pub fn extend(&mut self, seq: &mut Sequence<B>, tokens: &[u32]) -> Result<()> {
        self.run_self_decoder(seq, tokens).map(drop)
    }

    /// The self-decoder over `tokens` in chunks, caches advanced; the last row of its output.
    fn run_self_decoder(&mut self, seq: &mut Sequence<B>, tokens: &[u32]) -> Result<B::Buf> {
        if tokens.is_empty() {
            return Err(ForwardError::Empty);
        }
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(ForwardError::TokenOutOfRange { token, vocab: self.cfg.vocab_size });
        }
        let needed = (seq.pos + tokens.len()).div_ceil(self.opts.block_tokens).saturating_sub(seq.table.len());
        if needed > self.free_blocks.len() {
            return Err(ForwardError::CacheFull { needed, free: self.free_blocks.len() });
        }
        for _ in 0..needed {
            seq.table.push(self.free_blocks.pop().expect("counted above"));
        }
        let mut last = None;
        for chunk in tokens.chunks(self.opts.chunk_tokens) {
            last = Some(self.self_decode(seq, chunk)?);
        }
        Ok(last.expect("at least one chunk"))
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
            logits = self.forward(seq, &[next])?;
        }
        Ok((tokens, all))
    }

    /// The self-decoder over one chunk at the sequence's position, its K/V written into the
    /// global cache; returns the last row of the self-decoder's output.
    fn self_decode(&mut self, seq: &mut Sequence<B>, chunk: &[u32]) -> Result<B::Buf> {
        let b = &self.backend;
        let cfg = &self.cfg;
        let (n, dim, eps) = (chunk.len(), cfg.dim, cfg.norm_eps);
        let (heads, hd) = (cfg.n_self_heads, cfg.self_head_dim());
        let qd = heads * hd;
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
                    // subln: RMSNorm over each head, no weight.
                    let normed = b.rms_norm(&o, n * heads, hd, None, eps)?;
                    let mut gate = mm(&xn, n, g)?;
                    b.silu_mul(&mut gate, &normed, n * qd)?;
                    mm(&gate, n, out)?
                }
                (Mixer::Window { q, k, v, out, window }, State::Window { keys, values, rows }) => {
                    let (mut qh, mut kh, vh) = (mm(&xn, n, q)?, mm(&xn, n, k)?, mm(&xn, n, v)?);
                    b.rope(&mut qh, &rope, heads, hd)?;
                    b.rope(&mut kh, &rope, heads, hd)?;
                    let prefix = *rows;
                    let all_k = b.concat(keys, prefix, &kh, n, qd)?;
                    let all_v = b.concat(values, prefix, &vh, n, qd)?;
                    let o = b.window_attention(&qh, &all_k, &all_v, n, prefix, *window, heads, hd)?;
                    let keep = (prefix + n).min(window - 1);
                    let tail = prefix + n - keep..prefix + n;
                    *keys = b.rows(&all_k, qd, tail.clone())?;
                    *values = b.rows(&all_v, qd, tail)?;
                    *rows = keep;
                    mm(&o, n, out)?
                }
                _ => unreachable!("each layer's state is made for its mixer"),
            };
            b.add_assign(&mut x, &mixed, n * dim)?;
            let ffn_out = ffn(b, &l.ffn, &b.rms_norm(&x, n, dim, Some(&l.final_norm), eps)?, n, cfg.hidden_dim)?;
            b.add_assign(&mut x, &ffn_out, n * dim)?;
        }
        // This chunk's rows of the global cache.
        let xn = b.rms_norm(&x, n, dim, Some(&self.kv_norm), eps)?;
        let mut k = mm(&xn, n, &self.k_proj)?;
        let v = mm(&xn, n, &self.v_proj)?;
        b.rope(&mut k, &b.rope_table(&self.rope_cross, &positions)?, cfg.n_attn_kv_heads, cfg.head_dim())?;
        b.kv_write(&mut self.pool, &seq.table, seq.pos, &k, &v, n)?;
        seq.pos += n;
        Ok(b.rows(&x, dim, n - 1..n)?)
    }

    /// The cross-decoder for the last token seen (row `x`), over the whole global cache; then
    /// the final norm and the output projection.
    fn cross_decode(&self, seq: &Sequence<B>, x: &B::Buf) -> Result<Vec<f32>> {
        let b = &self.backend;
        let cfg = &self.cfg;
        let (dim, eps) = (cfg.dim, cfg.norm_eps);
        let shape = CrossShape { heads: cfg.n_attn_heads, kv_heads: cfg.n_attn_kv_heads, head_dim: cfg.head_dim() };
        let rope = b.rope_table(&self.rope_cross, &[(seq.pos - 1) as u32])?;
        // The whole cache, one table for every cross-decoder layer.
        let table = b.block_table(&self.pool, &seq.table, seq.pos)?;
        let mut x = b.rows(x, dim, 0..1)?;
        for l in &self.cross_layers {
            let xn = b.rms_norm(&x, 1, dim, Some(&l.norm), eps)?;
            let mut q = b.matmul(&xn, 1, &l.q.w)?;
            b.rope(&mut q, &rope, shape.heads, shape.head_dim)?;
            let o = b.cross_attention(&q, &self.pool, &table, shape)?;
            b.add_assign(&mut x, &b.matmul(&o, 1, &l.out.w)?, dim)?;
            let ffn_out = ffn(b, &l.ffn, &b.rms_norm(&x, 1, dim, Some(&l.final_norm), eps)?, 1, cfg.hidden_dim)?;
            b.add_assign(&mut x, &ffn_out, dim)?;
        }
        let xn = b.rms_norm(&x, 1, dim, Some(&self.norm), eps)?;
        let logits = b.matmul(&xn, 1, self.output.as_ref().map_or(&self.embed, |o| &o.w))?;
        Ok(b.download(&logits)?)
    }
}

/// SwiGLU feed-forward: `fc2(silu(fc1 x) ⊙ gate x)` over n rows.
fn ffn<B: Backend>(b: &B, f: &Ffn<B>, x: &B::Buf, n: usize, hidden: usize) -> Result<B::Buf> {
    let mut a = b.matmul(x, n, &f.fc1.w)?;
    b.silu_mul(&mut a, &b.matmul(x, n, &f.gate.w)?, n * hidden)?;
    Ok(b.matmul(&a, n, &f.fc2.w)?)
}
