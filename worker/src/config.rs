//! `params.json`: the model's shape, parsed strictly (a missing or invalid field is an error that
//! names it) and leniently (unknown fields are ignored, as checkpoints carry training settings).

use std::path::Path;

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path} is not valid JSON: {error}")]
    Json { path: String, error: serde_json::Error },
    #[error("params.json: missing field `{0}`")]
    Missing(&'static str),
    #[error("params.json: field `{field}` {problem}")]
    Invalid { field: &'static str, problem: String },
    #[error("params.json: the shape makes {what} larger than {MAX_SIZE_BYTES} bytes (or overflow)")]
    TooLarge { what: &'static str },
    #[error("tensor parallelism over {tp} ranks needs tp to divide {what} ({count})")]
    TensorParallel { tp: usize, what: &'static str, count: usize },
    #[error("tensor parallelism over {tp} ranks needs at least {tp} vocabulary ids; the model has {vocab}")]
    VocabularyTooSmall { tp: usize, vocab: usize },
}

/// Most bytes any size derived from the shape may come to (the weights, one sequence's
/// self-decoder state): far beyond any model a group can hold, and small enough that what
/// callers multiply these sizes by (tokens, blocks, layers) stays far from overflow.
pub const MAX_SIZE_BYTES: usize = 1 << 50;

/// Which constant-size mixer the self-decoder uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SelfMixerKind {
    /// Gated retention: a d×d state per head.
    GatedRetention,
    /// Sliding-window attention over the last `window` tokens (itself included).
    SlidingWindow { window: usize },
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    pub dim: usize,
    pub n_layers: usize,
    pub hidden_dim: usize,
    pub n_self_heads: usize,
    pub n_attn_heads: usize,
    pub n_attn_kv_heads: usize,
    pub vocab_size: usize,
    pub rope_theta: f64,
    pub norm_eps: f32,
    pub mixer: SelfMixerKind,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| ConfigError::Io { path: path.display().to_string(), error })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses the text of a `params.json`; `origin` (its path) words the errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let value: Value =
            serde_json::from_str(text).map_err(|error| ConfigError::Json { path: origin.to_string(), error })?;
        Self::from_json(&value)
    }

    pub fn from_json(value: &Value) -> Result<Self, ConfigError> {
        let obj = value
            .as_object()
            .ok_or(ConfigError::Invalid { field: "(root)", problem: "must be a JSON object".into() })?;
        let window = match obj.get("sliding_window") {
            None | Some(Value::Null) => None,
            Some(_) => Some(positive(obj, "sliding_window")?),
        };
        let cfg = ModelConfig {
            dim: positive(obj, "dim")?,
            n_layers: positive(obj, "n_layers")?,
            hidden_dim: positive(obj, "hidden_dim")?,
            n_self_heads: positive(obj, "n_self_heads")?,
            n_attn_heads: positive(obj, "n_attn_heads")?,
            n_attn_kv_heads: positive(obj, "n_attn_kv_heads")?,
            vocab_size: positive(obj, "vocab_size")?,
            rope_theta: optional_float(obj, "rope_theta", 10000.0)?,
            norm_eps: optional_float(obj, "norm_eps", 1e-5)? as f32,
            mixer: match window {
                None => SelfMixerKind::GatedRetention,
                Some(window) => SelfMixerKind::SlidingWindow { window },
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("dim".into(), self.dim.into());
        obj.insert("n_layers".into(), self.n_layers.into());
        obj.insert("hidden_dim".into(), self.hidden_dim.into());
        obj.insert("n_self_heads".into(), self.n_self_heads.into());
        obj.insert("n_attn_heads".into(), self.n_attn_heads.into());
        obj.insert("n_attn_kv_heads".into(), self.n_attn_kv_heads.into());
        obj.insert("vocab_size".into(), self.vocab_size.into());
        obj.insert("rope_theta".into(), self.rope_theta.into());
        obj.insert("norm_eps".into(), f64::from(self.norm_eps).into());
        if let SelfMixerKind::SlidingWindow { window } = self.mixer {
            obj.insert("sliding_window".into(), window.into());
        }
        Value::Object(obj)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, problem: String| Err(ConfigError::Invalid { field, problem });
        if !self.n_layers.is_multiple_of(2) {
            return invalid("n_layers", format!("must be even (self + cross halves), got {}", self.n_layers));
        }
        if !self.dim.is_multiple_of(self.n_self_heads) || !(self.dim / self.n_self_heads).is_multiple_of(2) {
            return invalid(
                "n_self_heads",
                format!("must divide dim {} into an even head dim, got {}", self.dim, self.n_self_heads),
            );
        }
        if !self.dim.is_multiple_of(self.n_attn_heads) || !(self.dim / self.n_attn_heads).is_multiple_of(2) {
            return invalid(
                "n_attn_heads",
                format!("must divide dim {} into an even head dim, got {}", self.dim, self.n_attn_heads),
            );
        }
        if !self.n_attn_heads.is_multiple_of(self.n_attn_kv_heads) {
            return invalid(
                "n_attn_kv_heads",
                format!("must divide n_attn_heads {}, got {}", self.n_attn_heads, self.n_attn_kv_heads),
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return invalid("rope_theta", format!("must be a finite number > 1, got {}", self.rope_theta));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return invalid("norm_eps", format!("must be a finite number > 0, got {}", self.norm_eps));
        }
        if self.vocab_size > u32::MAX as usize {
            return invalid("vocab_size", format!("must fit in 32 bits, got {}", self.vocab_size));
        }
        // Each field is bounded on its own, but their products need not be: a hostile or corrupt
        // params.json must be this error, not an overflow where the sizes are used.
        let bytes = |numbers: Option<usize>| numbers.and_then(|n| n.checked_mul(4)).filter(|&b| b <= MAX_SIZE_BYTES);
        if bytes(self.checked_n_params(false)).is_none() {
            return Err(ConfigError::TooLarge { what: "the weights" });
        }
        if bytes(self.checked_self_state_numbers()).is_none() {
            return Err(ConfigError::TooLarge { what: "one sequence's self-decoder state" });
        }
        Ok(())
    }

    /// Checks that the model splits over `tp` tensor-parallel ranks: `tp` must divide the
    /// self-decoder heads, the attention heads and the FFN width, and divide the KV heads or
    /// be a multiple of them (then each rank keeps a copy of the one KV head its query heads
    /// use, as when tp exceeds the KV heads of a GQA or MQA model in vLLM).
    pub fn check_tp(&self, tp: usize) -> Result<(), ConfigError> {
        let parts = [
            ("the self-decoder heads, n_self_heads", self.n_self_heads),
            ("the attention heads, n_attn_heads", self.n_attn_heads),
            ("the FFN width, hidden_dim", self.hidden_dim),
        ];
        if let Some((what, count)) = parts.into_iter().find(|&(_, count)| tp == 0 || !count.is_multiple_of(tp)) {
            return Err(ConfigError::TensorParallel { tp, what, count });
        }
        if self.vocab_size < tp {
            return Err(ConfigError::VocabularyTooSmall { tp, vocab: self.vocab_size });
        }
        let kv = self.n_attn_kv_heads;
        if !kv.is_multiple_of(tp) && !tp.is_multiple_of(kv) {
            return Err(ConfigError::TensorParallel {
                tp,
                what: "the KV heads, n_attn_kv_heads, or be a multiple of them",
                count: kv,
            });
        }
        Ok(())
    }

    pub fn n_self_layers(&self) -> usize {
        self.n_layers / 2
    }
    pub fn n_cross_layers(&self) -> usize {
        self.n_layers / 2
    }
    /// Head dim of the self-decoder mixer.
    pub fn self_head_dim(&self) -> usize {
        self.dim / self.n_self_heads
    }
    /// Head dim of cross-attention and of the global cache.
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_attn_heads
    }
    /// Width of one K (or V) row of the global cache.
    pub fn kv_dim(&self) -> usize {
        self.n_attn_kv_heads * self.head_dim()
    }
    /// Numbers stored in the global cache per token of context (K and V).
    pub fn cache_numbers_per_token(&self) -> usize {
        2 * self.kv_dim()
    }
    /// Numbers of self-decoder state one sequence keeps at most, whatever its length: a d×d
    /// state per head and layer for gated retention, the last W−1 keys and values per layer for
    /// the sliding window.
    pub fn self_state_numbers(&self) -> usize {
        self.checked_self_state_numbers().expect("a validated shape bounds the self-decoder state")
    }
    fn checked_self_state_numbers(&self) -> Option<usize> {
        let per_layer = match self.mixer {
            SelfMixerKind::GatedRetention => {
                self.n_self_heads.checked_mul(self.self_head_dim())?.checked_mul(self.self_head_dim())?
            }
            SelfMixerKind::SlidingWindow { window } => {
                window.saturating_sub(1).checked_mul(2)?.checked_mul(self.dim)?
            }
        };
        self.n_self_layers().checked_mul(per_layer)
    }
    /// Parameters of the model, counting a tied output projection once.
    pub fn n_params(&self, tied: bool) -> usize {
        self.checked_n_params(tied).expect("a validated shape bounds the parameter count")
    }
    fn checked_n_params(&self, tied: bool) -> Option<usize> {
        let (d, h) = (self.dim, self.hidden_dim);
        let dd = d.checked_mul(d)?;
        let ffn = d.checked_mul(h)?.checked_mul(3)?.checked_add(2 * d)?;
        let self_mixer = match self.mixer {
            SelfMixerKind::GatedRetention => dd.checked_mul(5)?.checked_add(self.n_self_heads.checked_mul(d)?)?,
            SelfMixerKind::SlidingWindow { .. } => dd.checked_mul(4)?,
        };
        let cross_mixer = dd.checked_mul(2)?;
        let embed = self.vocab_size.checked_mul(d)?.checked_mul(if tied { 1 } else { 2 })?;
        let self_layers = self.n_self_layers().checked_mul(self_mixer.checked_add(ffn)?)?;
        let cross_layers = self.n_cross_layers().checked_mul(cross_mixer.checked_add(ffn)?)?;
        // Two norms of `d` and the cross-decoder's K and V projections.
        let kv = self.kv_dim().checked_mul(d)?.checked_mul(2)?;
        embed.checked_add(self_layers)?.checked_add(cross_layers)?.checked_add(kv)?.checked_add(2 * d)
    }
}

fn positive(obj: &Map<String, Value>, field: &'static str) -> Result<usize, ConfigError> {
    let value = obj.get(field).ok_or(ConfigError::Missing(field))?;
    match value.as_u64() {
        Some(n) if n > 0 && n <= (1 << 40) => Ok(n as usize),
        _ => Err(ConfigError::Invalid { field, problem: format!("must be a positive integer, got {value}") }),
    }
}

fn optional_float(obj: &Map<String, Value>, field: &'static str, default: f64) -> Result<f64, ConfigError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(value) => value
            .as_f64()
            .ok_or_else(|| ConfigError::Invalid { field, problem: format!("must be a number, got {value}") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"dim": 32, "n_layers": 4, "hidden_dim": 64, "n_self_heads": 4, "n_attn_heads": 4,
               "n_attn_kv_heads": 2, "vocab_size": 96, "model_type": "yoco"})
    }

    #[test]
    fn parses_with_defaults_and_ignores_unknown_fields() {
        let cfg = ModelConfig::from_json(&base()).unwrap();
        assert_eq!(cfg.rope_theta, 10000.0);
        assert_eq!(cfg.norm_eps, 1e-5);
        assert_eq!(cfg.mixer, SelfMixerKind::GatedRetention);
        assert_eq!(cfg.kv_dim(), 16);
        let round = ModelConfig::from_json(&cfg.to_json()).unwrap();
        assert_eq!(round, cfg);
    }

    #[test]
    fn tensor_parallel_sizes_must_divide_every_split() {
        let cfg = ModelConfig::from_json(&base()).unwrap();
        for tp in [1, 2] {
            cfg.check_tp(tp).unwrap();
        }
        // 4 self heads, 4 attention heads, 2 KV heads (copied on 4 ranks), FFN 64.
        cfg.check_tp(4).unwrap();
        assert!(cfg.check_tp(3).unwrap_err().to_string().contains("n_self_heads"));
        let mut v = base();
        (v["n_self_heads"], v["n_attn_heads"], v["n_attn_kv_heads"]) = (json!(4), json!(12), json!(6));
        (v["dim"], v["hidden_dim"]) = (json!(96), json!(96));
        let err = ModelConfig::from_json(&v).unwrap().check_tp(4).unwrap_err().to_string();
        assert!(err.contains("n_attn_kv_heads") && err.contains("(6)"), "{err}");
        let mut v = base();
        v["hidden_dim"] = json!(66);
        v["n_attn_kv_heads"] = json!(4);
        let err = ModelConfig::from_json(&v).unwrap().check_tp(4).unwrap_err().to_string();
        assert!(err.contains("hidden_dim") && err.contains("(66)"), "{err}");
        assert!(cfg.check_tp(0).is_err());
        let mut v = base();
        v["vocab_size"] = json!(1);
        let err = ModelConfig::from_json(&v).unwrap().check_tp(2).unwrap_err().to_string();
        assert!(err.contains("at least 2 vocabulary ids"), "{err}");
    }

    #[test]
    fn sliding_window_and_null() {
        let mut v = base();
        v["sliding_window"] = json!(7);
        assert_eq!(ModelConfig::from_json(&v).unwrap().mixer, SelfMixerKind::SlidingWindow { window: 7 });
        v["sliding_window"] = Value::Null;
        assert_eq!(ModelConfig::from_json(&v).unwrap().mixer, SelfMixerKind::GatedRetention);
    }

    #[test]
    fn errors_name_the_field() {
        for field in ["dim", "n_layers", "hidden_dim", "n_self_heads", "n_attn_heads", "n_attn_kv_heads", "vocab_size"]
        {
            let mut v = base();
            v.as_object_mut().unwrap().remove(field);
            let err = ModelConfig::from_json(&v).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
            let mut v = base();
            v[field] = json!(-3);
            let err = ModelConfig::from_json(&v).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
        let mut v = base();
        v["n_attn_kv_heads"] = json!(3);
        assert!(ModelConfig::from_json(&v).unwrap_err().to_string().contains("n_attn_kv_heads"));
        let mut v = base();
        v["rope_theta"] = json!("big");
        assert!(ModelConfig::from_json(&v).unwrap_err().to_string().contains("rope_theta"));
        let mut v = base();
        v["sliding_window"] = json!(0);
        assert!(ModelConfig::from_json(&v).unwrap_err().to_string().contains("sliding_window"));
        assert!(ModelConfig::from_json(&json!([1, 2])).is_err());
    }

    /// Fields within their own bounds whose products overflowed (a panic in checked builds, a
    /// wrapped size in release ones) where the coordinator sizes caches from a worker's config.
    #[test]
    fn shapes_too_large_to_size_are_errors_not_overflows() {
        let huge = 1u64 << 40;
        let mut v = base();
        v["dim"] = json!(huge);
        v["hidden_dim"] = json!(huge);
        v["n_self_heads"] = json!(huge / 2);
        v["n_attn_heads"] = json!(huge / 2);
        let err = ModelConfig::from_json(&v).unwrap_err();
        assert!(matches!(err, ConfigError::TooLarge { what: "the weights" }), "{err}");
        let mut v = base();
        v["dim"] = json!(4096);
        v["sliding_window"] = json!(huge);
        let err = ModelConfig::from_json(&v).unwrap_err();
        assert!(matches!(err, ConfigError::TooLarge { what: "one sequence's self-decoder state" }), "{err}");
        // YOCO-3B's shape, with its padded vocabulary, is nowhere near the limit.
        let big = crate::presets::Preset::ThreeB.config();
        let cfg = ModelConfig::from_json(&big.to_json()).unwrap();
        assert_eq!(cfg.n_params(false), big.n_params(false));
        assert!(cfg.n_params(false) * 4 < MAX_SIZE_BYTES >> 10);
    }

    #[test]
    fn parses_text_and_names_its_origin() {
        let text = serde_json::to_string(&base()).unwrap();
        assert_eq!(ModelConfig::parse(&text, "x/params.json").unwrap(), ModelConfig::from_json(&base()).unwrap());
        let err = ModelConfig::parse("{\"dim\": ", "x/params.json").unwrap_err().to_string();
        assert!(err.contains("x/params.json") && err.contains("not valid JSON"), "{err}");
    }
}
