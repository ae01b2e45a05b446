//! `params.json`, as a worker reads it from a model directory (`ModelConfig::parse`, which
//! `from_file` uses) and as the coordinator reads the config a worker reports
//! (`serde_json` then `ModelConfig::from_json`). An accepted config must give every size derived
//! from it, in numbers and in bytes, without overflow (those sizes book caches and memory), and
//! must survive `to_json` unchanged.

use yoco_worker::config::{ModelConfig, SelfMixerKind};

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let parsed = ModelConfig::parse(&text, "params.json");
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) {
        let from_value = ModelConfig::from_json(&value);
        assert_eq!(from_value.as_ref().ok(), parsed.as_ref().ok());
    }
    let cfg = match parsed {
        Ok(cfg) => cfg,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let bytes = |numbers: usize| numbers.checked_mul(std::mem::size_of::<f32>()).expect("size in bytes overflows");
    bytes(cfg.n_params(true));
    bytes(cfg.n_params(false));
    bytes(cfg.self_state_numbers());
    bytes(cfg.cache_numbers_per_token());
    assert!(cfg.kv_dim() <= cfg.dim);
    assert!(cfg.head_dim() >= 2 && cfg.self_head_dim() >= 2);
    assert_eq!(cfg.n_self_layers() + cfg.n_cross_layers(), cfg.n_layers);
    if let SelfMixerKind::SlidingWindow { window } = cfg.mixer {
        assert!(window >= 1);
    }
    for tp in 0..=8 {
        if cfg.check_tp(tp).is_ok() {
            assert!(tp > 0 && cfg.n_attn_heads % tp == 0 && cfg.hidden_dim % tp == 0);
        }
    }
    let again = ModelConfig::from_json(&cfg.to_json()).expect("an accepted config round-trips");
    assert_eq!(again, cfg);
}
