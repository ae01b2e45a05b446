//! The YOCO model as loaded: weights named as in the reference checkpoint, this rank's
//! tensor-parallel part of them, in the element types asked for. Loading only: the forward
//! pass runs on a backend (`crate::engine`), which takes the tensors from here.

use std::path::Path;

use crate::config::{ConfigError, ModelConfig, SelfMixerKind};
use crate::kernels::cross_attention::CrossShape;
use crate::weights::{Part, Tensor, WeightDtype, WeightError, WeightFiles};

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
    pub fn self_heads(&self) -> usize {
        self.cfg.n_self_heads / self.tp.size
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
