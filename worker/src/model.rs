//! The YOCO model: weights named as in the reference checkpoint, and the forward pieces the
//! engine strings together. The model is immutable; every cache is passed in.

use std::path::Path;

use rayon::prelude::*;

use crate::cache::LayerState;
use crate::cache_groups::cache_groups;
use crate::comm::{Collective, CommError, Grid};
use crate::config::{ConfigError, ModelConfig, SelfMixerKind};
use crate::cp::{last_rows, retention_incoming};
use crate::kernels::cross_attention::{cross_attention_partials, finalize, CrossShape, KvView, Partial};
use crate::kernels::embedding::embed;
use crate::kernels::matmul::{linear, matmul_t};
use crate::kernels::retention::{
    retention_add_incoming, retention_chunkwise, retention_log_decay, retention_recurrent_step, RetentionShape,
    RETENTION_BLOCK,
};
use crate::kernels::rms_norm::{rms_norm, rms_norm_new};
use crate::kernels::rope::{apply_rope, Rope, RopeTable};
use crate::kernels::swiglu::{log_sigmoid, silu_mul};
use crate::kernels::window_attention::window_attention;
use crate::weights::{Part, Tensor, WeightDtype, WeightError, WeightFiles};

/// The gate logit normaliser of gated retention: `γ = logsigmoid(gt) / 16`.
const GATE_LOGIT_NORMALIZER: f32 = 16.0;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightError),
}

/// This rank's place in a tensor-parallel split of the weights: rank `rank` of `size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpShard {
    pub rank: usize,
    pub size: usize,
}

impl TpShard {
    /// The whole model on one rank.
    pub const WHOLE: TpShard = TpShard { rank: 0, size: 1 };

    /// This rank's part of `n` things that the size divides (heads, FFN columns).
    pub fn part(&self, n: usize) -> std::ops::Range<usize> {
        let k = n / self.size;
        self.rank * k..(self.rank + 1) * k
    }

    /// This rank's part of the vocabulary, which the size need not divide: parts differ by at
    /// most one id.
    pub fn vocab(&self, vocab: usize) -> std::ops::Range<usize> {
        self.rank * vocab / self.size..(self.rank + 1) * vocab / self.size
    }

    /// The rows of a matrix with `out` rows split by output: each rank computes its part of
    /// the outputs (the whole matrix on one rank).
    fn by_output(&self, out: usize) -> Part {
        self.rows(self.part(out))
    }

    /// The columns of a matrix with `inputs` columns split by input: each rank's product is a
    /// partial sum, all-reduced across the ranks.
    fn by_input(&self, inputs: usize) -> Part {
        if self.size == 1 {
            Part::Whole
        } else {
            Part::Cols(self.part(inputs))
        }
    }

    /// These rows of a matrix (the whole matrix on one rank).
    fn rows(&self, rows: std::ops::Range<usize>) -> Part {
        if self.size == 1 {
            Part::Whole
        } else {
            Part::Rows(rows)
        }
    }
}

/// A bias-free linear layer, weight `[out, in]` (y = x Wᵀ): this rank's part of it.
pub struct Linear {
    pub weight: Tensor,
    pub out_dim: usize,
    pub in_dim: usize,
}

impl Linear {
    fn load(
        files: &WeightFiles,
        name: &str,
        [out_dim, in_dim]: [usize; 2],
        dtype: WeightDtype,
        part: Part,
    ) -> Result<Self, WeightError> {
        let weight = files.get_part(&format!("{name}.weight"), &[out_dim, in_dim], dtype, part)?;
        Ok(Linear { out_dim: weight.shape[0], in_dim: weight.shape[1], weight })
    }

    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        matrix_product(x, &self.weight, self.in_dim, self.out_dim)
    }
}

/// `x [rows, k] · wᵀ` for a weight matrix `w [n, k]` in any of its element types.
fn matrix_product(x: &[f32], w: &Tensor, k: usize, n: usize) -> Vec<f32> {
    crate::with_weights!(w.view(), |w| linear(x, x.len() / k, k, w, n))
}

/// [`matrix_product`] into `out`, whose allocation it reuses where it is large enough: every
/// element is overwritten, and only elements beyond its old length are zeroed first.
fn matrix_product_into(x: &[f32], w: &Tensor, k: usize, n: usize, out: &mut Vec<f32>) {
    let m = x.len() / k;
    if out.capacity() < m * n {
        // Zeroed pages from the allocator, not written twice.
        *out = vec![0.0; m * n];
    } else {
        out.truncate(m * n);
        out.resize(m * n, 0.0);
    }
    crate::with_weights!(w.view(), |w| matmul_t(x, m, k, w, n, out))
}

fn norm_weight(files: &WeightFiles, name: &str, dim: usize) -> Result<Tensor, WeightError> {
    files.get(&format!("{name}.weight"), &[dim])
}

/// SwiGLU feed-forward: `fc2(silu(fc1 x) ⊙ gate x)`.
pub struct FeedForward {
    pub fc1: Linear,
    pub gate: Linear,
    pub fc2: Linear,
}

impl FeedForward {
    fn load(
        files: &WeightFiles,
        prefix: &str,
        cfg: &ModelConfig,
        dtype: WeightDtype,
        tp: TpShard,
    ) -> Result<Self, WeightError> {
        let (d, h) = (cfg.dim, cfg.hidden_dim);
        Ok(FeedForward {
            fc1: Linear::load(files, &format!("{prefix}.fc1"), [h, d], dtype, tp.by_output(h))?,
            gate: Linear::load(files, &format!("{prefix}.gate"), [h, d], dtype, tp.by_output(h))?,
            fc2: Linear::load(files, &format!("{prefix}.fc2"), [d, h], dtype, tp.by_input(h))?,
        })
    }

    /// This rank's part of the FFN: the whole of it once summed over the tensor-parallel ranks.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut a = self.fc1.forward(x);
        silu_mul(&mut a, &self.gate.forward(x));
        self.fc2.forward(&a)
    }
}

pub enum SelfMixer {
    Retention { q_proj: Linear, k_proj: Linear, v_proj: Linear, g_proj: Linear, gt_proj: Linear, out_proj: Linear },
    Window { q_proj: Linear, k_proj: Linear, v_proj: Linear, out_proj: Linear, window: usize },
}

pub struct SelfLayer {
    pub mixer_layer_norm: Tensor,
    pub mixer: SelfMixer,
    pub final_layer_norm: Tensor,
    pub ffn: FeedForward,
}

pub struct CrossLayer {
    pub mixer_layer_norm: Tensor,
    pub q_proj: Linear,
    pub out_proj: Linear,
    pub final_layer_norm: Tensor,
    pub ffn: FeedForward,
}

/// A run of consecutive tokens of one sequence inside a batch: rows `rows` of the batch's
/// activations hold positions `start_pos..`.
#[derive(Debug, Clone)]
pub struct Segment {
    pub rows: std::ops::Range<usize>,
    pub start_pos: usize,
    /// `Some` when the rows are this rank's chunk of tokens cut across the ranks of a group
    /// (context-parallel prefill); `None` when every rank holds the same rows (decode).
    pub shard: Option<Shard>,
}

/// This rank's place in a context-parallel cut: every rank's chunk length, in rank order.
#[derive(Debug, Clone)]
pub struct Shard {
    pub rank: usize,
    pub chunk_lens: Vec<usize>,
}

impl Segment {
    /// Whether this segment's self-decoder state must be exchanged with other ranks.
    fn distributed(&self) -> bool {
        self.shard.as_ref().is_some_and(|s| s.chunk_lens.len() > 1)
    }
}

fn protocol(reason: String) -> CommError {
    CommError::Protocol { peer: 0, reason }
}

pub struct Model {
    pub cfg: ModelConfig,
    pub embed_tokens: Tensor,
    pub self_layers: Vec<SelfLayer>,
    pub kv_layer_norm: Tensor,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub cross_layers: Vec<CrossLayer>,
    pub layer_norm: Tensor,
    /// `None` when tied to `embed_tokens`.
    pub output_projection: Option<Linear>,
    /// This rank's part of the weights.
    pub tp: TpShard,
    rope_self: Rope,
    rope_cross: Rope,
}

impl Model {
    /// Loads `params.json` and the `*.safetensors` of a model directory, each matrix in the
    /// element type the checkpoint stores it in.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        Self::load_as(dir, WeightDtype::Auto)
    }

    /// [`Model::load`] with the weight matrices in the element type `dtype` asks for.
    pub fn load_as(dir: &Path, dtype: WeightDtype) -> Result<Self, ModelError> {
        Self::load_sharded(dir, dtype, TpShard::WHOLE)
    }

    /// [`Model::load_as`] of this rank's tensor-parallel part of the weights only (Megatron
    /// style): heads and FFN columns split by output, `out_proj` and `fc2` by input, the
    /// embedding and output projection by vocabulary. An error names the first constraint the
    /// split breaks.
    pub fn load_sharded(dir: &Path, dtype: WeightDtype, tp: TpShard) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_file(&dir.join("params.json"))?;
        cfg.check_tp(tp.size)?;
        if tp.rank >= tp.size {
            let problem = format!("tensor-parallel rank {} must be below the size {}", tp.rank, tp.size);
            return Err(crate::config::ConfigError::Invalid { field: "tp", problem }.into());
        }
        let files = WeightFiles::open(dir)?;
        Ok(Self::from_weights(cfg, &files, dtype, tp)?)
    }

    /// The model of `cfg` from `files`; `tp` must be a split that `cfg` allows
    /// ([`ModelConfig::check_tp`]).
    pub fn from_weights(
        cfg: ModelConfig,
        files: &WeightFiles,
        dtype: WeightDtype,
        tp: TpShard,
    ) -> Result<Self, WeightError> {
        let d = cfg.dim;
        // A checkpoint of the other mixer kind must not load with half its tensors ignored.
        if let SelfMixerKind::SlidingWindow { .. } = cfg.mixer {
            let tensor = "self_decoder.layers.0.mixer.g_proj.weight";
            if files.contains(tensor) {
                return Err(WeightError::MixerMismatch {
                    configured: "sliding-window attention",
                    tensor: tensor.into(),
                });
            }
        }
        let self_layers = (0..cfg.n_self_layers())
            .map(|i| {
                let p = format!("self_decoder.layers.{i}");
                let lin = |name: &str, out: usize, part| {
                    Linear::load(files, &format!("{p}.mixer.{name}"), [out, d], dtype, part)
                };
                let mixer = match cfg.mixer {
                    SelfMixerKind::GatedRetention => SelfMixer::Retention {
                        q_proj: lin("q_proj", d, tp.by_output(d))?,
                        k_proj: lin("k_proj", d, tp.by_output(d))?,
                        v_proj: lin("v_proj", d, tp.by_output(d))?,
                        g_proj: lin("g_proj", d, tp.by_output(d))?,
                        gt_proj: lin("gt_proj", cfg.n_self_heads, tp.by_output(cfg.n_self_heads))?,
                        out_proj: lin("out_proj", d, tp.by_input(d))?,
                    },
                    SelfMixerKind::SlidingWindow { window } => SelfMixer::Window {
                        q_proj: lin("q_proj", d, tp.by_output(d))?,
                        k_proj: lin("k_proj", d, tp.by_output(d))?,
                        v_proj: lin("v_proj", d, tp.by_output(d))?,
                        out_proj: lin("out_proj", d, tp.by_input(d))?,
                        window,
                    },
                };
                Ok(SelfLayer {
                    mixer_layer_norm: norm_weight(files, &format!("{p}.mixer_layer_norm"), d)?,
                    mixer,
                    final_layer_norm: norm_weight(files, &format!("{p}.final_layer_norm"), d)?,
                    ffn: FeedForward::load(files, &format!("{p}.ffn"), &cfg, dtype, tp)?,
                })
            })
            .collect::<Result<Vec<_>, WeightError>>()?;
        let cross_layers = (0..cfg.n_cross_layers())
            .map(|j| {
                let p = format!("cross_decoder.layers.{j}");
                Ok(CrossLayer {
                    mixer_layer_norm: norm_weight(files, &format!("{p}.mixer_layer_norm"), d)?,
                    q_proj: Linear::load(files, &format!("{p}.mixer.q_proj"), [d, d], dtype, tp.by_output(d))?,
                    out_proj: Linear::load(files, &format!("{p}.mixer.out_proj"), [d, d], dtype, tp.by_input(d))?,
                    final_layer_norm: norm_weight(files, &format!("{p}.final_layer_norm"), d)?,
                    ffn: FeedForward::load(files, &format!("{p}.ffn"), &cfg, dtype, tp)?,
                })
            })
            .collect::<Result<Vec<_>, WeightError>>()?;
        // The vocabulary is split unevenly when it must be.
        let vocab = tp.rows(tp.vocab(cfg.vocab_size));
        let output_projection = if files.contains("output_projection.weight") {
            Some(Linear::load(files, "output_projection", [cfg.vocab_size, d], dtype, vocab.clone())?)
        } else {
            None
        };
        // This rank's KV heads: its part of them, or a copy of the one its query heads use when
        // there are fewer KV heads than ranks.
        let kv_rows = match (cfg.n_attn_kv_heads, cfg.head_dim()) {
            (kv, _) if kv >= tp.size => tp.by_output(cfg.kv_dim()),
            (kv, hd) => {
                let head = tp.rank / (tp.size / kv);
                Part::Rows(head * hd..(head + 1) * hd)
            }
        };
        let kv = |name: &str| Linear::load(files, name, [cfg.kv_dim(), d], dtype, kv_rows.clone());
        Ok(Model {
            embed_tokens: files.get_part("embed_tokens.weight", &[cfg.vocab_size, d], dtype, vocab)?,
            self_layers,
            kv_layer_norm: norm_weight(files, "cross_decoder.kv_layer_norm", d)?,
            k_proj: kv("cross_decoder.k_proj")?,
            v_proj: kv("cross_decoder.v_proj")?,
            cross_layers,
            layer_norm: norm_weight(files, "layer_norm", d)?,
            output_projection,
            tp,
            rope_self: Rope::new(cfg.rope_theta, cfg.self_head_dim()),
            rope_cross: Rope::new(cfg.rope_theta, cfg.head_dim()),
            cfg,
        })
    }

    /// Cross-attention on this rank: its query heads and the KV heads they use.
    pub fn cross_shape(&self) -> CrossShape {
        CrossShape {
            heads: self.cfg.n_attn_heads / self.tp.size,
            kv_heads: (self.cfg.n_attn_kv_heads / self.tp.size).max(1),
            head_dim: self.cfg.head_dim(),
        }
    }

    /// Width of this rank's part of a global-cache row (K or V): its KV heads.
    pub fn kv_dim(&self) -> usize {
        self.cross_shape().kv_dim()
    }

    /// The self-decoder heads this rank computes.
    fn self_heads(&self) -> usize {
        self.cfg.n_self_heads / self.tp.size
    }

    /// This rank's partial sums of a row-split product, summed over its tensor-parallel row.
    fn tp_sum(&self, mut partial: Vec<f32>, grid: &mut Grid) -> Result<Vec<f32>, CommError> {
        if self.tp.size > 1 {
            grid.tp().all_reduce_sum(&mut partial)?;
        }
        Ok(partial)
    }

    /// A fresh (empty) self-decoder cache for one sequence, one entry per self layer.
    pub fn new_self_state(&self) -> Vec<LayerState> {
        let (h, d) = (self.self_heads(), self.cfg.self_head_dim());
        self.self_layers
            .iter()
            .map(|l| match l.mixer {
                SelfMixer::Retention { .. } => LayerState::Retention { state: vec![0.0; h * d * d] },
                SelfMixer::Window { .. } => LayerState::Window { keys: Vec::new(), values: Vec::new() },
            })
            .collect()
    }

    /// Token embeddings scaled by `sqrt(dim)`, `[tokens, dim]`. With the vocabulary split,
    /// each rank looks up the ids it holds (zeros for the others) and the row sums them: exact,
    /// as every sum has one term that is not zero.
    pub fn embed(&self, tokens: &[u32], grid: &mut Grid) -> Result<Vec<f32>, CommError> {
        let (dim, scale) = (self.cfg.dim, (self.cfg.dim as f32).sqrt());
        if self.tp.size == 1 {
            return Ok(crate::with_weights!(self.embed_tokens.view(), |table| embed(tokens, table, dim, scale)));
        }
        let mine = self.tp.vocab(self.cfg.vocab_size);
        let held: Vec<u32> =
            tokens.iter().filter(|&&t| mine.contains(&(t as usize))).map(|&t| t - mine.start as u32).collect();
        let rows = crate::with_weights!(self.embed_tokens.view(), |table| embed(&held, table, dim, scale));
        let mut x = vec![0.0; tokens.len() * dim];
        let mut next = rows.chunks_exact(dim);
        for (&t, out) in tokens.iter().zip(x.chunks_exact_mut(dim)) {
            if mine.contains(&(t as usize)) {
                out.copy_from_slice(next.next().expect("one row per held id"));
            }
        }
        self.tp_sum(x, grid)
    }

    /// The self-decoder's RoPE angles for the given rows' positions.
    pub fn self_rope(&self, positions: &[usize]) -> RopeTable {
        self.rope_self.table(positions.iter().copied())
    }

    /// One self-decoder layer over a batch: `x [rows, dim]` is updated in place and each segment's
    /// layer cache advances past its tokens. `states[i]` belongs to `segments[i]`. Segments cut
    /// across ranks exchange what their neighbours need within the grid's column (one
    /// all-gather); the mixer's and the FFN's partial sums are summed within its row.
    pub fn self_layer(
        &self,
        layer: usize,
        x: &mut [f32],
        segments: &[Segment],
        states: &mut [&mut LayerState],
        rope: &RopeTable,
        grid: &mut Grid,
    ) -> Result<(), CommError> {
        let l = &self.self_layers[layer];
        let (dim, eps) = (self.cfg.dim, self.cfg.norm_eps);
        // This rank's heads: q, k, v and the mixer's output are `[rows, qd]`.
        let (heads, hd) = (self.self_heads(), self.cfg.self_head_dim());
        let qd = heads * hd;
        let xn = rms_norm_new(x, dim, Some(l.mixer_layer_norm.as_slice()), eps);
        let mixed = match &l.mixer {
            SelfMixer::Retention { q_proj, k_proj, v_proj, g_proj, gt_proj, out_proj } => {
                let (mut q, mut k, v) = (q_proj.forward(&xn), k_proj.forward(&xn), v_proj.forward(&xn));
                apply_rope(&mut q, heads, hd, rope);
                apply_rope(&mut k, heads, hd, rope);
                let gamma: Vec<f32> =
                    gt_proj.forward(&xn).iter().map(|&g| log_sigmoid(g) / GATE_LOGIT_NORMALIZER).collect();
                let mut o = vec![0.0; q.len()];
                // Each sequence's rows of `o`, in order (segments hold consecutive rows).
                let mut outs: Vec<&mut [f32]> = Vec::with_capacity(segments.len());
                let mut rest = &mut o[..];
                let mut at = 0;
                for seg in segments {
                    let (mine, tail) =
                        std::mem::take(&mut rest)[seg.rows.start * qd - at..].split_at_mut(seg.rows.len() * qd);
                    outs.push(mine);
                    (rest, at) = (tail, seg.rows.end * qd);
                }
                // Every sequence in parallel (a step of 32 decodes is 32 small state updates per
                // layer). A distributed segment runs its chunk from a zero state and returns that
                // state and its log-decay, packed; the true incoming state is added once every
                // rank's chunk state is known.
                let chunk_states: Vec<Option<Vec<f32>>> = segments
                    .par_iter()
                    .zip(states.par_iter_mut())
                    .zip(outs.par_iter_mut())
                    .map(|((seg, st), out)| {
                        let LayerState::Retention { state } = &mut **st else {
                            unreachable!("retention layer with a window state")
                        };
                        let r = seg.rows.start * qd..seg.rows.end * qd;
                        let g = &gamma[seg.rows.start * heads..seg.rows.end * heads];
                        let shape = RetentionShape { tokens: seg.rows.len(), heads, head_dim: hd };
                        let (qs, ks, vs) = (&q[r.clone()], &k[r.clone()], &v[r]);
                        if seg.distributed() {
                            let mut local = vec![0.0; state.len()];
                            retention_chunkwise(qs, ks, vs, g, shape, RETENTION_BLOCK, &mut local, out);
                            local.extend(retention_log_decay(g, heads).iter().map(|&d| d as f32));
                            Some(local)
                        } else {
                            if seg.rows.len() == 1 {
                                retention_recurrent_step(qs, ks, vs, g, heads, hd, state, out);
                            } else {
                                retention_chunkwise(qs, ks, vs, g, shape, RETENTION_BLOCK, state, out);
                            }
                            None
                        }
                    })
                    .collect();
                let packed: Vec<f32> = chunk_states.into_iter().flatten().flatten().collect();
                if !packed.is_empty() {
                    let all = grid.cp().all_gather(&packed)?;
                    let per = heads * hd * hd + heads;
                    if all.iter().any(|p| p.len() != packed.len()) {
                        return Err(protocol("retention states of different sizes across ranks".into()));
                    }
                    let distributed = segments.iter().zip(states.iter_mut()).filter(|(seg, _)| seg.distributed());
                    for (i, (seg, st)) in distributed.enumerate() {
                        let LayerState::Retention { state } = &mut **st else { unreachable!() };
                        let rank = seg.shard.as_ref().map_or(0, |s| s.rank);
                        let parts: Vec<(&[f32], &[f32])> = all
                            .iter()
                            .map(|p| {
                                (&p[i * per..i * per + heads * hd * hd], &p[i * per + heads * hd * hd..(i + 1) * per])
                            })
                            .collect();
                        let (incoming, after) = retention_incoming(state, &parts, heads, rank);
                        let r = seg.rows.start * qd..seg.rows.end * qd;
                        let g = &gamma[seg.rows.start * heads..seg.rows.end * heads];
                        let shape = RetentionShape { tokens: seg.rows.len(), heads, head_dim: hd };
                        retention_add_incoming(&q[r.clone()], g, shape, &incoming, &mut o[r]);
                        *state = after;
                    }
                }
                // subln: RMSNorm over each head, no weight.
                let mut normed = vec![0.0; o.len()];
                rms_norm(&o, hd, None, eps, &mut normed);
                let mut gate = g_proj.forward(&xn);
                silu_mul(&mut gate, &normed);
                out_proj.forward(&gate)
            }
            SelfMixer::Window { q_proj, k_proj, v_proj, out_proj, window } => {
                let (mut q, mut k, v) = (q_proj.forward(&xn), k_proj.forward(&xn), v_proj.forward(&xn));
                apply_rope(&mut q, heads, hd, rope);
                apply_rope(&mut k, heads, hd, rope);
                let halo = window - 1;
                let mut o = vec![0.0; q.len()];
                // Each distributed segment sends the last W−1 rows of its chunk to everyone.
                let mut packed = Vec::new();
                for seg in segments.iter().filter(|s| s.distributed()) {
                    let r = seg.rows.start * qd..seg.rows.end * qd;
                    packed.extend(last_rows(&[&k[r.clone()]], halo, qd));
                    packed.extend(last_rows(&[&v[r]], halo, qd));
                }
                let all =
                    if segments.iter().any(Segment::distributed) { grid.cp().all_gather(&packed)? } else { Vec::new() };
                let mut offsets = vec![0usize; all.len()];
                for (seg, st) in segments.iter().zip(states.iter_mut()) {
                    let LayerState::Window { keys, values } = &mut **st else {
                        unreachable!("window layer with a retention state")
                    };
                    let r = seg.rows.start * qd..seg.rows.end * qd;
                    let (prefix_k, prefix_v, after_k, after_v) = match &seg.shard {
                        Some(shard) if seg.distributed() => {
                            let mut tails_k = Vec::new();
                            let mut tails_v = Vec::new();
                            for (j, (buf, off)) in all.iter().zip(offsets.iter_mut()).enumerate() {
                                let n = shard.chunk_lens[j].min(halo) * qd;
                                let tk = buf.get(*off..*off + n).ok_or_else(|| protocol("short window halo".into()))?;
                                let tv = buf
                                    .get(*off + n..*off + 2 * n)
                                    .ok_or_else(|| protocol("short window halo".into()))?;
                                tails_k.push(tk);
                                tails_v.push(tv);
                                *off += 2 * n;
                            }
                            let before = |tails: &[&[f32]], own: &Vec<f32>, upto: usize| {
                                let mut parts: Vec<&[f32]> = vec![own];
                                parts.extend(&tails[..upto]);
                                last_rows(&parts, halo, qd)
                            };
                            let world = shard.chunk_lens.len();
                            (
                                before(&tails_k, keys, shard.rank),
                                before(&tails_v, values, shard.rank),
                                Some(before(&tails_k, keys, world)),
                                Some(before(&tails_v, values, world)),
                            )
                        }
                        _ => (std::mem::take(keys), std::mem::take(values), None, None),
                    };
                    let prefix = prefix_k.len() / qd;
                    let mut all_k = prefix_k;
                    all_k.extend_from_slice(&k[r.clone()]);
                    let mut all_v = prefix_v;
                    all_v.extend_from_slice(&v[r.clone()]);
                    window_attention(&q[r.clone()], &all_k, &all_v, prefix, *window, heads, hd, &mut o[r]);
                    *keys = after_k.unwrap_or_else(|| last_rows(&[&all_k], halo, qd));
                    *values = after_v.unwrap_or_else(|| last_rows(&[&all_v], halo, qd));
                }
                out_proj.forward(&o)
            }
        };
        add_in_place(x, &self.tp_sum(mixed, grid)?);
        let hn = rms_norm_new(x, dim, Some(l.final_layer_norm.as_slice()), eps);
        add_in_place(x, &self.tp_sum(l.ffn.forward(&hn), grid)?);
        Ok(())
    }

    /// This rank's part of the global cache rows for self-decoder outputs `x` at `positions`:
    /// `(K, V)` of its KV heads, each `[rows, kv_dim()]`, K rotated.
    pub fn kv_project(&self, x: &[f32], positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let xn = rms_norm_new(x, self.cfg.dim, Some(self.kv_layer_norm.as_slice()), self.cfg.norm_eps);
        let mut k = self.k_proj.forward(&xn);
        let v = self.v_proj.forward(&xn);
        let table = self.rope_cross.table(positions.iter().copied());
        apply_rope(&mut k, self.cross_shape().kv_heads, self.cfg.head_dim(), &table);
        (k, v)
    }

    /// The cross-decoder for self-decoder outputs `x [rows, dim]` (the same rows on every rank).
    /// Row r sits at `positions[r]` and sees the first `visible[r]` rows of this rank's cache
    /// shard `views[r]`; the partial attentions of the grid's column (the other positions) are
    /// merged with log-sum-exp, and the row's (the other heads) summed after `out_proj`.
    ///
    /// On a single rank, rows whose caches together overflow the last-level cache (`llc` bytes)
    /// go through all layers a few at a time, the groups in parallel ([`cache_groups`]): every
    /// layer after the first then finds their caches in that cache. (A group of ranks runs each
    /// layer's collectives in one order on every rank, so there all rows go layer by layer.)
    pub fn cross_decode(
        &self,
        x: Vec<f32>,
        positions: &[usize],
        views: &[&KvView],
        visible: &[usize],
        llc: usize,
        grid: &mut Grid,
    ) -> Result<Vec<f32>, CommError> {
        let dim = self.cfg.dim;
        let groups = if grid.world() == 1 {
            let bytes: Vec<usize> =
                views.iter().zip(visible).map(|(v, &len)| len * 2 * v.kv_dim * v.element_bytes()).collect();
            cache_groups(&bytes, llc, rayon::current_num_threads())
        } else {
            None
        };
        let Some(groups) = groups else {
            return self.cross_layers(x, positions, views, visible, grid);
        };
        let outs = groups
            .into_par_iter()
            .map(|g| {
                let rows = x[g.start * dim..g.end * dim].to_vec();
                self.cross_layers(rows, &positions[g.clone()], &views[g.clone()], &visible[g], &mut Grid::single())
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(outs.concat())
    }

    /// [`Self::cross_decode`], every layer over all rows.
    fn cross_layers(
        &self,
        mut x: Vec<f32>,
        positions: &[usize],
        views: &[&KvView],
        visible: &[usize],
        grid: &mut Grid,
    ) -> Result<Vec<f32>, CommError> {
        let (dim, eps) = (self.cfg.dim, self.cfg.norm_eps);
        let shape = self.cross_shape();
        let table = self.rope_cross.table(positions.iter().copied());
        for l in &self.cross_layers {
            let xn = rms_norm_new(&x, dim, Some(l.mixer_layer_norm.as_slice()), eps);
            let mut q = l.q_proj.forward(&xn);
            apply_rope(&mut q, shape.heads, shape.head_dim, &table);
            let parts = cross_attention_partials(&q, visible, views, shape);
            let merged = if grid.cp_size() > 1 { merge_across_ranks(&parts, shape, &mut grid.cp())? } else { parts };
            let mut o = vec![0.0; q.len()];
            for (part, row) in merged.iter().zip(o.chunks_exact_mut(shape.q_dim())) {
                finalize(part, shape, row);
            }
            add_in_place(&mut x, &self.tp_sum(l.out_proj.forward(&o), grid)?);
            let hn = rms_norm_new(&x, dim, Some(l.final_layer_norm.as_slice()), eps);
            add_in_place(&mut x, &self.tp_sum(l.ffn.forward(&hn), grid)?);
        }
        Ok(x)
    }

    /// Final norm and output projection: `[rows, vocab]`, on every rank (each computes its part
    /// of the vocabulary, gathered across its tensor-parallel row).
    pub fn logits(&self, x: &[f32], grid: &mut Grid) -> Result<Vec<f32>, CommError> {
        self.logits_into(x, grid, Vec::new())
    }

    /// [`Self::logits`] in `buf` (on a tensor-parallel rank, a new vector), reusing its
    /// allocation: a decode step's `[rows, vocab]` is megabytes (12.8 MB at 32 rows of 100K),
    /// whose fresh pages cost more to fault in and zero than the step's sampling takes.
    pub fn logits_into(&self, x: &[f32], grid: &mut Grid, mut buf: Vec<f32>) -> Result<Vec<f32>, CommError> {
        let xn = rms_norm_new(x, self.cfg.dim, Some(self.layer_norm.as_slice()), self.cfg.norm_eps);
        let (dim, vocab) = (self.cfg.dim, self.embed_tokens.shape[0]);
        if self.tp.size == 1 {
            match &self.output_projection {
                Some(out) => matrix_product_into(&xn, &out.weight, out.in_dim, out.out_dim, &mut buf),
                None => matrix_product_into(&xn, &self.embed_tokens, dim, vocab, &mut buf),
            }
            return Ok(buf);
        }
        let part = match &self.output_projection {
            Some(out) => out.forward(&xn),
            None => matrix_product(&xn, &self.embed_tokens, self.cfg.dim, self.embed_tokens.shape[0]),
        };
        if self.tp.size == 1 {
            return Ok(part);
        }
        let rows = x.len() / self.cfg.dim;
        let parts = grid.tp().all_gather(&part)?;
        let widths: Vec<usize> =
            (0..self.tp.size).map(|rank| TpShard { rank, ..self.tp }.vocab(self.cfg.vocab_size).len()).collect();
        let mut logits = Vec::with_capacity(rows * self.cfg.vocab_size);
        for r in 0..rows {
            for (t, (p, &width)) in parts.iter().zip(&widths).enumerate() {
                let row = p.get(r * width..(r + 1) * width).ok_or_else(|| CommError::Protocol {
                    peer: t,
                    reason: "a vocabulary part of the wrong size".into(),
                })?;
                logits.extend_from_slice(row);
            }
        }
        Ok(logits)
    }

    /// Every tensor of the model.
    fn tensors(&self) -> Vec<&Tensor> {
        let mut all = vec![&self.embed_tokens, &self.kv_layer_norm, &self.k_proj.weight, &self.v_proj.weight];
        all.push(&self.layer_norm);
        all.extend(self.output_projection.as_ref().map(|l| &l.weight));
        for l in &self.self_layers {
            all.extend([
                &l.mixer_layer_norm,
                &l.final_layer_norm,
                &l.ffn.fc1.weight,
                &l.ffn.gate.weight,
                &l.ffn.fc2.weight,
            ]);
            match &l.mixer {
                SelfMixer::Retention { q_proj, k_proj, v_proj, g_proj, gt_proj, out_proj } => {
                    all.extend([q_proj, k_proj, v_proj, g_proj, gt_proj, out_proj].map(|l| &l.weight))
                }
                SelfMixer::Window { q_proj, k_proj, v_proj, out_proj, .. } => {
                    all.extend([q_proj, k_proj, v_proj, out_proj].map(|l| &l.weight))
                }
            }
        }
        for l in &self.cross_layers {
            all.extend([&l.mixer_layer_norm, &l.final_layer_norm, &l.q_proj.weight, &l.out_proj.weight]);
            all.extend([&l.ffn.fc1.weight, &l.ffn.gate.weight, &l.ffn.fc2.weight]);
        }
        all
    }

    /// Bytes of weights this process holds (memory-mapped weights count as file pages).
    pub fn weight_bytes(&self) -> usize {
        self.tensors().iter().map(|t| t.bytes()).sum()
    }

    /// Bytes of weights copied into process memory (the rest are pages of the mapped files).
    pub fn owned_weight_bytes(&self) -> usize {
        self.tensors().iter().map(|t| t.owned_bytes()).sum()
    }

    /// The element type of the weight matrices: `f32`, `bf16`, `f16`, or `mixed` when the
    /// checkpoint stores them in several.
    pub fn weight_dtype(&self) -> &'static str {
        let matrices: Vec<&Tensor> = self.tensors().into_iter().filter(|t| t.shape.len() == 2).collect();
        let first = matrices[0].elem();
        if matrices.iter().all(|t| t.elem() == first) {
            first.name()
        } else {
            "mixed"
        }
    }
}

/// All-gathers every rank's partials (`o`, `m`, `l` per row) and merges them in rank order, so
/// every rank gets the same bits.
fn merge_across_ranks(
    parts: &[Partial],
    shape: CrossShape,
    comm: &mut dyn Collective,
) -> Result<Vec<Partial>, CommError> {
    let mut packed = Vec::with_capacity(parts.len() * Partial::packed_len(shape));
    for p in parts {
        p.pack_into(&mut packed);
    }
    let all = comm.all_gather(&packed)?;
    if all.iter().any(|p| p.len() != packed.len()) {
        return Err(protocol("attention partials of different sizes across ranks".into()));
    }
    Ok((0..parts.len()).map(|r| Partial::merge_gathered(&all, r, shape)).collect())
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
