//! bf16 compute on the CPU (`EngineOptions::compute_dtype`): prefill's large products take the
//! activations rounded to bf16 with f32 accumulation (`kernels::matmul_bf16`), everything else
//! stays f32. Against the same bf16 weights computed in f32, the logits of a prompt stay within
//! bf16's rounding of the activations (2⁻⁸ relative each, through a few layers: 1e-2 of the
//! logits' spread here) and the greedy token is the same; where the CPU has neither AMX nor
//! AVX512_BF16 the engine computes in f32 and says so.

mod common;

use std::sync::Arc;

use common::*;
use yoco_worker::backend::Backend;
use yoco_worker::config::SelfMixerKind;
use yoco_worker::engine::{Engine, EngineOptions, Logits, StepItem};
use yoco_worker::kernels::matmul_bf16;
use yoco_worker::model::Model;
use yoco_worker::presets::{write_random_model, StoreDtype};
use yoco_worker::sampling::argmax;
use yoco_worker::weights::ComputeDtype;

fn logits(model: &Arc<Model>, compute: ComputeDtype, prompt: &[u32]) -> (Vec<f32>, &'static str) {
    let opts =
        EngineOptions { block_tokens: 16, cache_budget_bytes: 16 << 20, compute_dtype: compute, ..Default::default() };
    let mut e = Engine::new(model.clone(), &opts);
    e.add_sequence(1).unwrap();
    let out = e.step(&[StepItem::prefill(1, prompt, Logits::Last)]).unwrap().remove(0).logits.into_vec();
    (out, e.backend().compute_name())
}

#[test]
fn bf16_products_stay_within_bf16_rounding_of_f32_ones() {
    for mixer in [SelfMixerKind::GatedRetention, SelfMixerKind::SlidingWindow { window: 16 }] {
        let tmp = tempfile::tempdir().unwrap();
        write_random_model(&small_config(mixer), StoreDtype::Bf16, 3, false, tmp.path()).unwrap();
        let model = Arc::new(Model::load(tmp.path()).unwrap());
        assert_eq!(model.weight_dtype(), "bf16");
        // 300 rows: past the 64 rows below which products stream the weights in f32.
        let prompt = tokens(300, 300, 9);
        let (want, f32_name) = (logits(&model, ComputeDtype::F32, &prompt).0, "f32");
        let (got, name) = logits(&model, ComputeDtype::Bf16, &prompt);
        let (auto, auto_name) = logits(&model, ComputeDtype::Auto, &prompt);
        assert_eq!(auto_name, name, "auto on bf16 weights is bf16");
        assert_eq!(auto, got);
        if !matmul_bf16::available() {
            assert_eq!(name, f32_name, "without AMX or AVX512_BF16 the products stay f32");
            assert_eq!(got, want);
            continue;
        }
        assert_eq!(name, "bf16");
        assert_ne!(got, want, "{mixer:?}: the bf16 path ran");
        let spread = want.iter().fold(f32::MIN, |a, &b| a.max(b)) - want.iter().fold(f32::MAX, |a, &b| a.min(b));
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        eprintln!("{mixer:?}: max abs diff {worst} of a spread of {spread}");
        assert!(worst <= 1e-2 * spread, "{mixer:?}: max |Δ| {worst} of a spread of {spread}");
        assert_eq!(argmax(&got), argmax(&want), "{mixer:?}: the greedy token");
    }
}
