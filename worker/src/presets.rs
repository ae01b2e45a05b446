//! Model directories with random weights (`yoco init-model`): the built-in default model, and
//! models of any preset size for tests and benchmarks. No public YOCO weights exist.

use std::borrow::Cow;
use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use safetensors::{Dtype, View};

use crate::config::{ModelConfig, SelfMixerKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// dim 256, 8 layers, gated retention (the built-in default model before one was trained).
    Tiny,
    Small,
    /// YOCO-3B's shape.
    ThreeB,
}

impl Preset {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "tiny" => Some(Preset::Tiny),
            "small" => Some(Preset::Small),
            "3b" => Some(Preset::ThreeB),
            _ => None,
        }
    }

    pub fn config(self) -> ModelConfig {
        let (dim, n_layers, hidden_dim, n_self_heads, n_attn_heads, n_attn_kv_heads) = match self {
            Preset::Tiny => (256, 8, 768, 4, 4, 1),
            Preset::Small => (512, 8, 1408, 8, 8, 2),
            Preset::ThreeB => (3072, 26, 8192, 24, 24, 8),
        };
        ModelConfig {
            dim,
            n_layers,
            hidden_dim,
            n_self_heads,
            n_attn_heads,
            n_attn_kv_heads,
            vocab_size: 100288,
            rope_theta: 10000.0,
            norm_eps: 1e-5,
            mixer: SelfMixerKind::GatedRetention,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    F32,
    Bf16,
    F16,
}

impl StoreDtype {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "f32" => Some(StoreDtype::F32),
            "bf16" => Some(StoreDtype::Bf16),
            "f16" => Some(StoreDtype::F16),
            _ => None,
        }
    }
    fn size(self) -> usize {
        if self == StoreDtype::F32 {
            4
        } else {
            2
        }
    }
}

/// How one tensor is initialised.
#[derive(Clone, Copy)]
enum Init {
    Normal(f32),
    Ones,
}

/// A tensor generated when the writer asks for its bytes, so that writing a model needs the
/// memory of one tensor, not of the whole model.
struct Lazy {
    shape: Vec<usize>,
    init: Init,
    dtype: StoreDtype,
    seed: u64,
}

const CHUNK: usize = 1 << 20;

impl View for &Lazy {
    fn dtype(&self) -> Dtype {
        match self.dtype {
            StoreDtype::F32 => Dtype::F32,
            StoreDtype::Bf16 => Dtype::BF16,
            StoreDtype::F16 => Dtype::F16,
        }
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let n: usize = self.shape.iter().product();
        let mut bytes = vec![0u8; n * self.dtype.size()];
        bytes.par_chunks_mut(CHUNK * self.dtype.size()).enumerate().for_each(|(c, out)| {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let normal = match self.init {
                Init::Normal(std) => Some(Normal::new(0.0f32, std).expect("std is positive")),
                Init::Ones => None,
            };
            for slot in out.chunks_exact_mut(self.dtype.size()) {
                let v = normal.map_or(1.0, |d| d.sample(&mut rng));
                match self.dtype {
                    StoreDtype::F32 => slot.copy_from_slice(&v.to_le_bytes()),
                    StoreDtype::Bf16 => slot.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                    StoreDtype::F16 => slot.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                }
            }
        });
        Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// Names, shapes and initialisation of every tensor of `cfg`, in checkpoint naming.
fn tensor_specs(cfg: &ModelConfig, tied: bool) -> Vec<(String, Vec<usize>, Init)> {
    let (d, h, v) = (cfg.dim, cfg.hidden_dim, cfg.vocab_size);
    let lin = |out: usize, inp: usize| (vec![out, inp], Init::Normal(1.0 / (inp as f32).sqrt()));
    let mut specs = vec![("embed_tokens.weight".to_string(), vec![v, d], Init::Normal(1.0 / (d as f32).sqrt()))];
    let mut layer = |p: String, mixer: Vec<(&str, usize)>| {
        specs.push((format!("{p}.mixer_layer_norm.weight"), vec![d], Init::Ones));
        for (name, out) in mixer {
            let (shape, init) = lin(out, d);
            specs.push((format!("{p}.mixer.{name}.weight"), shape, init));
        }
        specs.push((format!("{p}.final_layer_norm.weight"), vec![d], Init::Ones));
        for (name, (shape, init)) in [("fc1", lin(h, d)), ("gate", lin(h, d)), ("fc2", lin(d, h))] {
            specs.push((format!("{p}.ffn.{name}.weight"), shape, init));
        }
    };
    for i in 0..cfg.n_self_layers() {
        let mixer = match cfg.mixer {
            SelfMixerKind::GatedRetention => {
                vec![
                    ("q_proj", d),
                    ("k_proj", d),
                    ("v_proj", d),
                    ("g_proj", d),
                    ("gt_proj", cfg.n_self_heads),
                    ("out_proj", d),
                ]
            }
            SelfMixerKind::SlidingWindow { .. } => {
                vec![("q_proj", d), ("k_proj", d), ("v_proj", d), ("out_proj", d)]
            }
        };
        layer(format!("self_decoder.layers.{i}"), mixer);
    }
    for j in 0..cfg.n_cross_layers() {
        layer(format!("cross_decoder.layers.{j}"), vec![("q_proj", d), ("out_proj", d)]);
    }
    specs.push(("cross_decoder.kv_layer_norm.weight".into(), vec![d], Init::Ones));
    for name in ["k_proj", "v_proj"] {
        let (shape, init) = lin(cfg.kv_dim(), d);
        specs.push((format!("cross_decoder.{name}.weight"), shape, init));
    }
    specs.push(("layer_norm.weight".into(), vec![d], Init::Ones));
    if !tied {
        let (shape, init) = lin(v, d);
        specs.push(("output_projection.weight".into(), shape, init));
    }
    specs
}

/// Writes `params.json` and `model.safetensors` with random weights for `cfg` into `out`.
pub fn write_random_model(
    cfg: &ModelConfig,
    dtype: StoreDtype,
    seed: u64,
    tied: bool,
    out: &Path,
) -> std::io::Result<()> {
    std::fs::create_dir_all(out)?;
    let tensors: Vec<(String, Lazy)> = tensor_specs(cfg, tied)
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape, init))| {
            let seed = seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
            (name, Lazy { shape, init, dtype, seed })
        })
        .collect();
    let tmp = out.join("model.safetensors.partial");
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), None, &tmp)
        .map_err(std::io::Error::other)?;
    std::fs::rename(&tmp, out.join("model.safetensors"))?;
    let params = serde_json::to_string_pretty(&cfg.to_json()).expect("config serialises");
    std::fs::write(out.join("params.json"), params + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;

    #[test]
    fn written_models_load_and_are_reproducible() {
        let mut cfg = Preset::Tiny.config();
        cfg.vocab_size = 300;
        cfg.dim = 64;
        cfg.hidden_dim = 96;
        let dir = tempfile::tempdir().unwrap();
        for (dtype, tied, window) in [(StoreDtype::F32, false, None), (StoreDtype::Bf16, true, Some(4))] {
            if let Some(window) = window {
                cfg.mixer = SelfMixerKind::SlidingWindow { window };
            }
            let a = dir.path().join("a");
            write_random_model(&cfg, dtype, 5, tied, &a).unwrap();
            let model = Model::load(&a).unwrap();
            assert_eq!(model.cfg, cfg);
            assert_eq!(model.output_projection.is_none(), tied);
            let b = dir.path().join("b");
            write_random_model(&cfg, dtype, 5, tied, &b).unwrap();
            let read = |p: &Path| std::fs::read(p.join("model.safetensors")).unwrap();
            assert_eq!(read(&a), read(&b), "same seed, same bytes");
            write_random_model(&cfg, dtype, 6, tied, &b).unwrap();
            assert_ne!(read(&a), read(&b));
        }
    }
}
