//! The YOCO model: weights named as in the reference checkpoint, and the forward pieces the
//! engine strings together. The model is immutable; every cache is passed in.

use std::path::Path;

use crate::cache::LayerState;
use crate::config::{ConfigError, ModelConfig, SelfMixerKind};
use crate::kernels::cross_attention::{cross_attention, CrossShape, KvView};
use crate::kernels::embedding::embed;
use crate::kernels::matmul::linear;
use crate::kernels::retention::{
    retention_chunkwise, retention_recurrent_step, RetentionShape, RETENTION_BLOCK,
};
use crate::kernels::rms_norm::{rms_norm, rms_norm_new};
use crate::kernels::rope::{apply_rope, Rope, RopeTable};
use crate::kernels::swiglu::{log_sigmoid, silu_mul};
use crate::kernels::window_attention::window_attention;
use crate::weights::{Tensor, WeightError, WeightFiles};

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
    ) -> Result<Self, WeightError> {
        Ok(Linear {
            weight: files.get(&format!("{name}.weight"), &[out_dim, in_dim])?,
            out_dim,
            in_dim,
        })
    }

    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        linear(
            x,
            x.len() / self.in_dim,
            self.in_dim,
            self.weight.as_slice(),
            self.out_dim,
        )
    }
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
    fn load(files: &WeightFiles, prefix: &str, cfg: &ModelConfig) -> Result<Self, WeightError> {
        let (d, h) = (cfg.dim, cfg.hidden_dim);
        Ok(FeedForward {
            fc1: Linear::load(files, &format!("{prefix}.fc1"), h, d)?,
            gate: Linear::load(files, &format!("{prefix}.gate"), h, d)?,
            fc2: Linear::load(files, &format!("{prefix}.fc2"), d, h)?,
        })
    }

    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut a = self.fc1.forward(x);
        silu_mul(&mut a, &self.gate.forward(x));
        self.fc2.forward(&a)
    }
}

pub enum SelfMixer {
    Retention {
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
        g_proj: Linear,
        gt_proj: Linear,
        out_proj: Linear,
    },
    Window {
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
        out_proj: Linear,
        window: usize,
    },
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
    /// Loads `params.json` and the `*.safetensors` of a model directory.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_file(&dir.join("params.json"))?;
        let files = WeightFiles::open(dir)?;
        Ok(Self::from_weights(cfg, &files)?)
    }

    pub fn from_weights(cfg: ModelConfig, files: &WeightFiles) -> Result<Self, WeightError> {
        let d = cfg.dim;
        let self_layers = (0..cfg.n_self_layers())
            .map(|i| {
                let p = format!("self_decoder.layers.{i}");
                let lin = |name: &str, out: usize| {
                    Linear::load(files, &format!("{p}.mixer.{name}"), out, d)
                };
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
                    ffn: FeedForward::load(files, &format!("{p}.ffn"), &cfg)?,
                })
            })
            .collect::<Result<Vec<_>, WeightError>>()?;
        let cross_layers = (0..cfg.n_cross_layers())
            .map(|j| {
                let p = format!("cross_decoder.layers.{j}");
                Ok(CrossLayer {
                    mixer_layer_norm: norm_weight(files, &format!("{p}.mixer_layer_norm"), d)?,
                    q_proj: Linear::load(files, &format!("{p}.mixer.q_proj"), d, d)?,
                    out_proj: Linear::load(files, &format!("{p}.mixer.out_proj"), d, d)?,
                    final_layer_norm: norm_weight(files, &format!("{p}.final_layer_norm"), d)?,
                    ffn: FeedForward::load(files, &format!("{p}.ffn"), &cfg)?,
                })
            })
            .collect::<Result<Vec<_>, WeightError>>()?;
        let output_projection = if files.contains("output_projection.weight") {
            Some(Linear::load(files, "output_projection", cfg.vocab_size, d)?)
        } else {
            None
        };
        Ok(Model {
            embed_tokens: files.get("embed_tokens.weight", &[cfg.vocab_size, d])?,
            self_layers,
            kv_layer_norm: norm_weight(files, "cross_decoder.kv_layer_norm", d)?,
            k_proj: Linear::load(files, "cross_decoder.k_proj", cfg.kv_dim(), d)?,
            v_proj: Linear::load(files, "cross_decoder.v_proj", cfg.kv_dim(), d)?,
            cross_layers,
            layer_norm: norm_weight(files, "layer_norm", d)?,
            output_projection,
            rope_self: Rope::new(cfg.rope_theta, cfg.self_head_dim()),
            rope_cross: Rope::new(cfg.rope_theta, cfg.head_dim()),
            cfg,
        })
    }

    pub fn cross_shape(&self) -> CrossShape {
        CrossShape {
            heads: self.cfg.n_attn_heads,
            kv_heads: self.cfg.n_attn_kv_heads,
            head_dim: self.cfg.head_dim(),
        }
    }

    /// A fresh (empty) self-decoder cache for one sequence, one entry per self layer.
    pub fn new_self_state(&self) -> Vec<LayerState> {
        let (h, d) = (self.cfg.n_self_heads, self.cfg.self_head_dim());
        self.self_layers
            .iter()
            .map(|l| match l.mixer {
                SelfMixer::Retention { .. } => LayerState::Retention {
                    state: vec![0.0; h * d * d],
                },
                SelfMixer::Window { .. } => LayerState::Window {
                    keys: Vec::new(),
                    values: Vec::new(),
                },
            })
            .collect()
    }

    /// Token embeddings scaled by `sqrt(dim)`, `[tokens, dim]`.
    pub fn embed(&self, tokens: &[u32]) -> Vec<f32> {
        embed(
            tokens,
            self.embed_tokens.as_slice(),
            self.cfg.dim,
            (self.cfg.dim as f32).sqrt(),
        )
    }

    /// The self-decoder's RoPE angles for the given rows' positions.
    pub fn self_rope(&self, positions: &[usize]) -> RopeTable {
        self.rope_self.table(positions.iter().copied())
    }

    /// One self-decoder layer over a batch: `x [rows, dim]` is updated in place and each segment's
    /// layer cache advances past its tokens. `states[i]` belongs to `segments[i]`.
    pub fn self_layer(
        &self,
        layer: usize,
        x: &mut [f32],
        segments: &[Segment],
        states: &mut [&mut LayerState],
        rope: &RopeTable,
    ) {
        let l = &self.self_layers[layer];
        let (dim, eps) = (self.cfg.dim, self.cfg.norm_eps);
        let (heads, hd) = (self.cfg.n_self_heads, self.cfg.self_head_dim());
        let xn = rms_norm_new(x, dim, Some(l.mixer_layer_norm.as_slice()), eps);
        let mixed = match &l.mixer {
            SelfMixer::Retention {
                q_proj,
                k_proj,
                v_proj,
                g_proj,
                gt_proj,
                out_proj,
            } => {
                let (mut q, mut k, v) = (
                    q_proj.forward(&xn),
                    k_proj.forward(&xn),
                    v_proj.forward(&xn),
                );
                apply_rope(&mut q, heads, hd, rope);
                apply_rope(&mut k, heads, hd, rope);
                let gamma: Vec<f32> = gt_proj
                    .forward(&xn)
                    .iter()
                    .map(|&g| log_sigmoid(g) / GATE_LOGIT_NORMALIZER)
                    .collect();
                let mut o = vec![0.0; q.len()];
                for (seg, st) in segments.iter().zip(states.iter_mut()) {
                    let LayerState::Retention { state } = &mut **st else {
                        unreachable!("retention layer with a window state")
                    };
                    let r = seg.rows.start * dim..seg.rows.end * dim;
                    let g = &gamma[seg.rows.start * heads..seg.rows.end * heads];
                    if seg.rows.len() == 1 {
                        retention_recurrent_step(
                            &q[r.clone()],
                            &k[r.clone()],
                            &v[r.clone()],
                            g,
                            heads,
                            hd,
                            state,
                            &mut o[r],
                        );
                    } else {
                        let shape = RetentionShape {
                            tokens: seg.rows.len(),
                            heads,
                            head_dim: hd,
                        };
                        let (qs, ks, vs) = (&q[r.clone()], &k[r.clone()], &v[r.clone()]);
                        retention_chunkwise(
                            qs,
                            ks,
                            vs,
                            g,
                            shape,
                            RETENTION_BLOCK,
                            state,
                            &mut o[r],
                        );
                    }
                }
                // subln: RMSNorm over each head, no weight.
                let mut normed = vec![0.0; o.len()];
                rms_norm(&o, hd, None, eps, &mut normed);
                let mut gate = g_proj.forward(&xn);
                silu_mul(&mut gate, &normed);
                out_proj.forward(&gate)
            }
            SelfMixer::Window {
                q_proj,
                k_proj,
                v_proj,
                out_proj,
                window,
            } => {
                let (mut q, mut k, v) = (
                    q_proj.forward(&xn),
                    k_proj.forward(&xn),
                    v_proj.forward(&xn),
                );
                apply_rope(&mut q, heads, hd, rope);
                apply_rope(&mut k, heads, hd, rope);
                let mut o = vec![0.0; q.len()];
                for (seg, st) in segments.iter().zip(states.iter_mut()) {
                    let LayerState::Window { keys, values } = &mut **st else {
                        unreachable!("window layer with a retention state")
                    };
                    let r = seg.rows.start * dim..seg.rows.end * dim;
                    let prefix = keys.len() / dim;
                    keys.extend_from_slice(&k[r.clone()]);
                    values.extend_from_slice(&v[r.clone()]);
                    window_attention(
                        &q[r.clone()],
                        keys,
                        values,
                        prefix,
                        *window,
                        heads,
                        hd,
                        &mut o[r],
                    );
                    let keep = (keys.len() / dim).min(window - 1);
                    let drop = keys.len() - keep * dim;
                    keys.drain(..drop);
                    values.drain(..drop);
                }
                out_proj.forward(&o)
            }
        };
        add_in_place(x, &mixed);
        let hn = rms_norm_new(x, dim, Some(l.final_layer_norm.as_slice()), eps);
        add_in_place(x, &l.ffn.forward(&hn));
    }

    /// Rows of the global cache for self-decoder outputs `x` at `positions`: `(K, V)`, each
    /// `[rows, kv_dim]`, K rotated.
    pub fn kv_project(&self, x: &[f32], positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let xn = rms_norm_new(
            x,
            self.cfg.dim,
            Some(self.kv_layer_norm.as_slice()),
            self.cfg.norm_eps,
        );
        let mut k = self.k_proj.forward(&xn);
        let v = self.v_proj.forward(&xn);
        let table = self.rope_cross.table(positions.iter().copied());
        apply_rope(
            &mut k,
            self.cfg.n_attn_kv_heads,
            self.cfg.head_dim(),
            &table,
        );
        (k, v)
    }

    /// The cross-decoder for self-decoder outputs `x [rows, dim]`: row r at `positions[r]`
    /// attends over positions `0..=positions[r]` of `views[r]`.
    pub fn cross_decode(
        &self,
        mut x: Vec<f32>,
        positions: &[usize],
        views: &[&KvView],
    ) -> Vec<f32> {
        let (dim, eps) = (self.cfg.dim, self.cfg.norm_eps);
        let shape = self.cross_shape();
        let table = self.rope_cross.table(positions.iter().copied());
        for l in &self.cross_layers {
            let xn = rms_norm_new(&x, dim, Some(l.mixer_layer_norm.as_slice()), eps);
            let mut q = l.q_proj.forward(&xn);
            apply_rope(&mut q, shape.heads, shape.head_dim, &table);
            let mut o = vec![0.0; q.len()];
            cross_attention(&q, positions, views, shape, &mut o);
            add_in_place(&mut x, &l.out_proj.forward(&o));
            let hn = rms_norm_new(&x, dim, Some(l.final_layer_norm.as_slice()), eps);
            add_in_place(&mut x, &l.ffn.forward(&hn));
        }
        x
    }

    /// Final norm and output projection: `[rows, vocab]`.
    pub fn logits(&self, x: &[f32]) -> Vec<f32> {
        let xn = rms_norm_new(
            x,
            self.cfg.dim,
            Some(self.layer_norm.as_slice()),
            self.cfg.norm_eps,
        );
        match &self.output_projection {
            Some(out) => out.forward(&xn),
            None => linear(
                &xn,
                xn.len() / self.cfg.dim,
                self.cfg.dim,
                self.embed_tokens.as_slice(),
                self.cfg.vocab_size,
            ),
        }
    }

    /// Bytes of weights this process holds (memory-mapped f32 weights count as file pages).
    pub fn weight_bytes(&self) -> usize {
        4 * self.cfg.n_params(self.output_projection.is_none())
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
