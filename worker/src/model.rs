//! The YOCO model: weights named as in the reference checkpoint, and the forward pieces the
//! engine strings together. The model is immutable; every cache is passed in.

use std::path::Path;

use crate::cache::LayerState;
use crate::comm::{Collective, CommError};
use crate::config::{ConfigError, ModelConfig, SelfMixerKind};
use crate::cp::{last_rows, retention_incoming};
use crate::kernels::cross_attention::{
    cross_attention_partials, finalize, merge_partials, CrossShape, KvView, Partial,
};
use crate::kernels::embedding::embed;
use crate::kernels::matmul::linear;
use crate::kernels::retention::{
    retention_add_incoming, retention_chunkwise, retention_log_decay, retention_recurrent_step, RetentionShape,
    RETENTION_BLOCK,
};
use crate::kernels::rms_norm::{rms_norm, rms_norm_new};
use crate::kernels::rope::{apply_rope, Rope, RopeTable};
use crate::kernels::swiglu::{log_sigmoid, silu_mul};
use crate::kernels::window_attention::window_attention;
use crate::weights::{Tensor, WeightDtype, WeightError, WeightFiles};

/// The gate logit normaliser of gated retention: `γ = logsigmoid(gt) / 16`.
const GATE_LOGIT_NORMALIZER: f32 = 16.0;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightError),
}

/// A bias-free linear layer, weight `[out, in]` (y = x Wᵀ).
pub struct Linear {
    pub weight: Tensor,
    pub out_dim: usize,
    pub in_dim: usize,
}

impl Linear {
    fn load(
        files: &WeightFiles,
        name: &str,
        out_dim: usize,
        in_dim: usize,
        dtype: WeightDtype,
    ) -> Result<Self, WeightError> {
        Ok(Linear { weight: files.get_as(&format!("{name}.weight"), &[out_dim, in_dim], dtype)?, out_dim, in_dim })
    }

    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        matrix_product(x, &self.weight, self.in_dim, self.out_dim)
    }
}

/// `x [rows, k] · wᵀ` for a weight matrix `w [n, k]` in any of its element types.
fn matrix_product(x: &[f32], w: &Tensor, k: usize, n: usize) -> Vec<f32> {
    crate::with_weights!(w.view(), |w| linear(x, x.len() / k, k, w, n))
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
    fn load(files: &WeightFiles, prefix: &str, cfg: &ModelConfig, dtype: WeightDtype) -> Result<Self, WeightError> {
        let (d, h) = (cfg.dim, cfg.hidden_dim);
        Ok(FeedForward {
            fc1: Linear::load(files, &format!("{prefix}.fc1"), h, d, dtype)?,
            gate: Linear::load(files, &format!("{prefix}.gate"), h, d, dtype)?,
            fc2: Linear::load(files, &format!("{prefix}.fc2"), d, h, dtype)?,
        })
    }

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
        let cfg = ModelConfig::from_file(&dir.join("params.json"))?;
        let files = WeightFiles::open(dir)?;
        Ok(Self::from_weights(cfg, &files, dtype)?)
    }

    pub fn from_weights(cfg: ModelConfig, files: &WeightFiles, dtype: WeightDtype) -> Result<Self, WeightError> {
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
                let lin = |name: &str, out: usize| Linear::load(files, &format!("{p}.mixer.{name}"), out, d, dtype);
                let mixer = match cfg.mixer {
                    SelfMixerKind::GatedRetention => SelfMixer::Retention {
                        q_proj: lin("q_proj", d)?,
                        k_proj: lin("k_proj", d)?,
                        v_proj: lin("v_proj", d)?,
                        g_proj: lin("g_proj", d)?,
                        gt_proj: lin("gt_proj", cfg.n_self_heads)?,
                        out_proj: lin("out_proj", d)?,
                    },
                    SelfMixerKind::SlidingWindow { window } => SelfMixer::Window {
                        q_proj: lin("q_proj", d)?,
                        k_proj: lin("k_proj", d)?,
                        v_proj: lin("v_proj", d)?,
                        out_proj: lin("out_proj", d)?,
                        window,
                    },
                };
                Ok(SelfLayer {
                    mixer_layer_norm: norm_weight(files, &format!("{p}.mixer_layer_norm"), d)?,
                    mixer,
                    final_layer_norm: norm_weight(files, &format!("{p}.final_layer_norm"), d)?,
                    ffn: FeedForward::load(files, &format!("{p}.ffn"), &cfg, dtype)?,
                })
            })
            .collect::<Result<Vec<_>, WeightError>>()?;
        let cross_layers = (0..cfg.n_cross_layers())
            .map(|j| {
                let p = format!("cross_decoder.layers.{j}");
                Ok(CrossLayer {
                    mixer_layer_norm: norm_weight(files, &format!("{p}.mixer_layer_norm"), d)?,
                    q_proj: Linear::load(files, &format!("{p}.mixer.q_proj"), d, d, dtype)?,
                    out_proj: Linear::load(files, &format!("{p}.mixer.out_proj"), d, d, dtype)?,
                    final_layer_norm: norm_weight(files, &format!("{p}.final_layer_norm"), d)?,
                    ffn: FeedForward::load(files, &format!("{p}.ffn"), &cfg, dtype)?,
                })
            })
            .collect::<Result<Vec<_>, WeightError>>()?;
        let output_projection = if files.contains("output_projection.weight") {
            Some(Linear::load(files, "output_projection", cfg.vocab_size, d, dtype)?)
        } else {
            None
        };
        Ok(Model {
            embed_tokens: files.get_as("embed_tokens.weight", &[cfg.vocab_size, d], dtype)?,
            self_layers,
            kv_layer_norm: norm_weight(files, "cross_decoder.kv_layer_norm", d)?,
            k_proj: Linear::load(files, "cross_decoder.k_proj", cfg.kv_dim(), d, dtype)?,
            v_proj: Linear::load(files, "cross_decoder.v_proj", cfg.kv_dim(), d, dtype)?,
            cross_layers,
            layer_norm: norm_weight(files, "layer_norm", d)?,
            output_projection,
            rope_self: Rope::new(cfg.rope_theta, cfg.self_head_dim()),
            rope_cross: Rope::new(cfg.rope_theta, cfg.head_dim()),
            cfg,
        })
    }

    pub fn cross_shape(&self) -> CrossShape {
        CrossShape { heads: self.cfg.n_attn_heads, kv_heads: self.cfg.n_attn_kv_heads, head_dim: self.cfg.head_dim() }
    }

    /// A fresh (empty) self-decoder cache for one sequence, one entry per self layer.
    pub fn new_self_state(&self) -> Vec<LayerState> {
        let (h, d) = (self.cfg.n_self_heads, self.cfg.self_head_dim());
        self.self_layers
            .iter()
            .map(|l| match l.mixer {
                SelfMixer::Retention { .. } => LayerState::Retention { state: vec![0.0; h * d * d] },
                SelfMixer::Window { .. } => LayerState::Window { keys: Vec::new(), values: Vec::new() },
            })
            .collect()
    }

    /// Token embeddings scaled by `sqrt(dim)`, `[tokens, dim]`.
    pub fn embed(&self, tokens: &[u32]) -> Vec<f32> {
        let scale = (self.cfg.dim as f32).sqrt();
        crate::with_weights!(self.embed_tokens.view(), |table| embed(tokens, table, self.cfg.dim, scale))
    }

    /// The self-decoder's RoPE angles for the given rows' positions.
    pub fn self_rope(&self, positions: &[usize]) -> RopeTable {
        self.rope_self.table(positions.iter().copied())
    }

    /// One self-decoder layer over a batch: `x [rows, dim]` is updated in place and each segment's
    /// layer cache advances past its tokens. `states[i]` belongs to `segments[i]`. Segments cut
    /// across ranks exchange what their neighbours need through `comm` (one all-gather).
    pub fn self_layer(
        &self,
        layer: usize,
        x: &mut [f32],
        segments: &[Segment],
        states: &mut [&mut LayerState],
        rope: &RopeTable,
        comm: &mut dyn Collective,
    ) -> Result<(), CommError> {
        let l = &self.self_layers[layer];
        let (dim, eps) = (self.cfg.dim, self.cfg.norm_eps);
        let (heads, hd) = (self.cfg.n_self_heads, self.cfg.self_head_dim());
        let xn = rms_norm_new(x, dim, Some(l.mixer_layer_norm.as_slice()), eps);
        let mixed = match &l.mixer {
            SelfMixer::Retention { q_proj, k_proj, v_proj, g_proj, gt_proj, out_proj } => {
                let (mut q, mut k, v) = (q_proj.forward(&xn), k_proj.forward(&xn), v_proj.forward(&xn));
                apply_rope(&mut q, heads, hd, rope);
                apply_rope(&mut k, heads, hd, rope);
                let gamma: Vec<f32> =
                    gt_proj.forward(&xn).iter().map(|&g| log_sigmoid(g) / GATE_LOGIT_NORMALIZER).collect();
                let mut o = vec![0.0; q.len()];
                let mut packed = Vec::new();
                for (seg, st) in segments.iter().zip(states.iter_mut()) {
                    let LayerState::Retention { state } = &mut **st else {
                        unreachable!("retention layer with a window state")
                    };
                    let r = seg.rows.start * dim..seg.rows.end * dim;
                    let g = &gamma[seg.rows.start * heads..seg.rows.end * heads];
                    let shape = RetentionShape { tokens: seg.rows.len(), heads, head_dim: hd };
                    let (qs, ks, vs) = (&q[r.clone()], &k[r.clone()], &v[r.clone()]);
                    if seg.distributed() {
                        // This rank's chunk from a zero state; the true incoming state is
                        // added once every rank's chunk state is known.
                        let mut local = vec![0.0; state.len()];
                        retention_chunkwise(qs, ks, vs, g, shape, RETENTION_BLOCK, &mut local, &mut o[r]);
                        packed.extend(local);
                        packed.extend(retention_log_decay(g, heads).iter().map(|&d| d as f32));
                    } else if seg.rows.len() == 1 {
                        retention_recurrent_step(qs, ks, vs, g, heads, hd, state, &mut o[r]);
                    } else {
                        retention_chunkwise(qs, ks, vs, g, shape, RETENTION_BLOCK, state, &mut o[r]);
                    }
                }
                if !packed.is_empty() {
                    let all = comm.all_gather(&packed)?;
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
                        let r = seg.rows.start * dim..seg.rows.end * dim;
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
                    let r = seg.rows.start * dim..seg.rows.end * dim;
                    packed.extend(last_rows(&[&k[r.clone()]], halo, dim));
                    packed.extend(last_rows(&[&v[r]], halo, dim));
                }
                let all =
                    if segments.iter().any(Segment::distributed) { comm.all_gather(&packed)? } else { Vec::new() };
                let mut offsets = vec![0usize; all.len()];
                for (seg, st) in segments.iter().zip(states.iter_mut()) {
                    let LayerState::Window { keys, values } = &mut **st else {
                        unreachable!("window layer with a retention state")
                    };
                    let r = seg.rows.start * dim..seg.rows.end * dim;
                    let (prefix_k, prefix_v, after_k, after_v) = match &seg.shard {
                        Some(shard) if seg.distributed() => {
                            let mut tails_k = Vec::new();
                            let mut tails_v = Vec::new();
                            for (j, (buf, off)) in all.iter().zip(offsets.iter_mut()).enumerate() {
                                let n = shard.chunk_lens[j].min(halo) * dim;
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
                                last_rows(&parts, halo, dim)
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
                    let prefix = prefix_k.len() / dim;
                    let mut all_k = prefix_k;
                    all_k.extend_from_slice(&k[r.clone()]);
                    let mut all_v = prefix_v;
                    all_v.extend_from_slice(&v[r.clone()]);
                    window_attention(&q[r.clone()], &all_k, &all_v, prefix, *window, heads, hd, &mut o[r]);
                    *keys = after_k.unwrap_or_else(|| last_rows(&[&all_k], halo, dim));
                    *values = after_v.unwrap_or_else(|| last_rows(&[&all_v], halo, dim));
                }
                out_proj.forward(&o)
            }
        };
        add_in_place(x, &mixed);
        let hn = rms_norm_new(x, dim, Some(l.final_layer_norm.as_slice()), eps);
        add_in_place(x, &l.ffn.forward(&hn));
        Ok(())
    }

    /// Rows of the global cache for self-decoder outputs `x` at `positions`: `(K, V)`, each
    /// `[rows, kv_dim]`, K rotated.
    pub fn kv_project(&self, x: &[f32], positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let xn = rms_norm_new(x, self.cfg.dim, Some(self.kv_layer_norm.as_slice()), self.cfg.norm_eps);
        let mut k = self.k_proj.forward(&xn);
        let v = self.v_proj.forward(&xn);
        let table = self.rope_cross.table(positions.iter().copied());
        apply_rope(&mut k, self.cfg.n_attn_kv_heads, self.cfg.head_dim(), &table);
        (k, v)
    }

    /// The cross-decoder for self-decoder outputs `x [rows, dim]` (the same rows on every rank).
    /// Row r sits at `positions[r]` and sees the first `visible[r]` rows of this rank's cache
    /// shard `views[r]`; partial attentions of all ranks are merged with log-sum-exp.
    pub fn cross_decode(
        &self,
        mut x: Vec<f32>,
        positions: &[usize],
        views: &[&KvView],
        visible: &[usize],
        comm: &mut dyn Collective,
    ) -> Result<Vec<f32>, CommError> {
        let (dim, eps) = (self.cfg.dim, self.cfg.norm_eps);
        let shape = self.cross_shape();
        let table = self.rope_cross.table(positions.iter().copied());
        for l in &self.cross_layers {
            let xn = rms_norm_new(&x, dim, Some(l.mixer_layer_norm.as_slice()), eps);
            let mut q = l.q_proj.forward(&xn);
            apply_rope(&mut q, shape.heads, shape.head_dim, &table);
            let parts = cross_attention_partials(&q, visible, views, shape);
            let merged = if comm.world() > 1 { merge_across_ranks(&parts, shape, comm)? } else { parts };
            let mut o = vec![0.0; q.len()];
            for (part, row) in merged.iter().zip(o.chunks_exact_mut(shape.q_dim())) {
                finalize(part, shape, row);
            }
            add_in_place(&mut x, &l.out_proj.forward(&o));
            let hn = rms_norm_new(&x, dim, Some(l.final_layer_norm.as_slice()), eps);
            add_in_place(&mut x, &l.ffn.forward(&hn));
        }
        Ok(x)
    }

    /// Final norm and output projection: `[rows, vocab]`.
    pub fn logits(&self, x: &[f32]) -> Vec<f32> {
        let xn = rms_norm_new(x, self.cfg.dim, Some(self.layer_norm.as_slice()), self.cfg.norm_eps);
        match &self.output_projection {
            Some(out) => out.forward(&xn),
            None => matrix_product(&xn, &self.embed_tokens, self.cfg.dim, self.cfg.vocab_size),
        }
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
    let per = shape.q_dim() + 2 * shape.heads;
    let mut packed = Vec::with_capacity(parts.len() * per);
    for p in parts {
        packed.extend(&p.o);
        packed.extend(&p.m);
        packed.extend(&p.l);
    }
    let all = comm.all_gather(&packed)?;
    if all.iter().any(|p| p.len() != packed.len()) {
        return Err(protocol("attention partials of different sizes across ranks".into()));
    }
    let (qd, h) = (shape.q_dim(), shape.heads);
    Ok((0..parts.len())
        .map(|r| {
            let ranks: Vec<Partial> = all
                .iter()
                .map(|buf| {
                    let b = &buf[r * per..(r + 1) * per];
                    Partial { o: b[..qd].to_vec(), m: b[qd..qd + h].to_vec(), l: b[qd + h..].to_vec() }
                })
                .collect();
            merge_partials(&ranks, shape)
        })
        .collect())
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
