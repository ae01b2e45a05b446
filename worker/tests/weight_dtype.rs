//! Weight matrices in bf16 or f16: the kernels widen them to f32 as they read them, so a model
//! whose matrices were rounded agrees with its f32 original up to that rounding, and every
//! parallel path agrees with the single-rank run of the same weights to f32 tolerance. A
//! checkpoint stored in bf16 is used in place (memory-mapped) and computes exactly what its
//! values widened to f32 compute.

mod common;

use std::sync::Arc;

use common::{assert_parallel_paths_agree, prefill_then_decode, rel_err, small_config, tokens};
use yoco_worker::config::SelfMixerKind;
use yoco_worker::engine::{Engine, EngineOptions};
use yoco_worker::model::Model;
use yoco_worker::presets::{write_random_model, StoreDtype};
use yoco_worker::weights::WeightDtype;

const VOCAB: usize = 300;

fn opts() -> EngineOptions {
    EngineOptions { block_tokens: 16, cache_budget_bytes: 64 << 20, ..EngineOptions::default() }
}

fn load(dir: &std::path::Path, dtype: WeightDtype) -> Arc<Model> {
    Arc::new(Model::load_as(dir, dtype).unwrap_or_else(|e| panic!("{}: {e}", dir.display())))
}

#[test]
fn half_weights_match_f32_to_their_rounding_and_themselves_across_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let prompt = tokens(150, VOCAB, 3);
    let extra = tokens(6, VOCAB, 4);
    // Tied embeddings on one mixer, a separate output projection on the other: both logit paths.
    for (mixer, tied) in [(SelfMixerKind::GatedRetention, false), (SelfMixerKind::SlidingWindow { window: 8 }, true)] {
        let dir = tmp.path().join(format!("{mixer:?}"));
        write_random_model(&small_config(mixer), StoreDtype::F32, 29, tied, &dir).unwrap();
        let full = load(&dir, WeightDtype::F32);
        assert_eq!(full.weight_dtype(), "f32");
        let f32_run = prefill_then_decode(&mut Engine::new(full.clone(), &opts()), &prompt, 150, &extra);
        // Every matrix rounded to 8 (bf16) or 11 (f16) significant bits, through 8 layers of a
        // random model; measured: bf16 2.6e-2-6.5e-2, f16 4.1e-3-8.6e-3.
        for (dtype, name, bound) in [(WeightDtype::Bf16, "bf16", 1.5e-1), (WeightDtype::F16, "f16", 2e-2)] {
            let model = load(&dir, dtype);
            assert_eq!(model.weight_dtype(), name);
            let (half_bytes, f32_bytes) = (model.weight_bytes() as f64, full.weight_bytes() as f64);
            assert!(half_bytes < 0.51 * f32_bytes, "{name}: {half_bytes} bytes of weights vs {f32_bytes} in f32");
            let whole = prefill_then_decode(&mut Engine::new(model.clone(), &opts()), &prompt, 150, &extra);
            let err = rel_err(&whole, &f32_run);
            eprintln!("{mixer:?}: {name} weights vs f32: largest relative logit error {err:.2e}");
            assert!(err < bound && err > 0.0, "{mixer:?} {name} vs f32: rel err {err:e} (bound {bound:e})");
            assert_parallel_paths_agree(&model, &opts(), &prompt, &extra, &whole, &format!("{mixer:?} {name}"));
        }
    }
}

#[test]
fn a_half_checkpoint_is_used_in_place_and_computes_as_its_widened_values() {
    let tmp = tempfile::tempdir().unwrap();
    let prompt = tokens(70, VOCAB, 5);
    let extra = tokens(3, VOCAB, 6);
    for (store, name) in [(StoreDtype::Bf16, "bf16"), (StoreDtype::F16, "f16")] {
        let dir = tmp.path().join(name);
        write_random_model(&small_config(SelfMixerKind::GatedRetention), store, 31, false, &dir).unwrap();
        let mapped = load(&dir, WeightDtype::Auto);
        assert_eq!(mapped.weight_dtype(), name);
        // Only the norm vectors (kept in f32) are copied.
        let norms = mapped.cfg.dim * (2 * mapped.cfg.n_layers + 2) * 4;
        assert_eq!(mapped.owned_weight_bytes(), norms, "{name}: the matrices are the file's pages");
        let widened = load(&dir, WeightDtype::F32);
        assert_eq!(widened.owned_weight_bytes(), widened.weight_bytes(), "{name} widened: all copied");
        let want = prefill_then_decode(&mut Engine::new(widened, &opts()), &prompt, 32, &extra);
        let got = prefill_then_decode(&mut Engine::new(mapped, &opts()), &prompt, 32, &extra);
        let err = rel_err(&got, &want);
        assert!(err < 1e-5, "{name} in place vs widened to f32: {err:e}");
    }
}

#[test]
fn weight_dtype_names_parse_back() {
    for d in [WeightDtype::Auto, WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
        assert_eq!(d.name().parse::<WeightDtype>().unwrap(), d);
    }
    assert_eq!("".parse::<WeightDtype>().unwrap(), WeightDtype::Auto);
    assert!("int8".parse::<WeightDtype>().unwrap_err().contains("expected auto, f32, bf16 or f16"));
}
