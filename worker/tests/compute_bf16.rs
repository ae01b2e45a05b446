//! bf16 compute on the CPU (`EngineOptions::compute_dtype`): products of
//! `matmul_bf16::MIN_ROWS` rows or more take the activations rounded to bf16 with f32
//! accumulation (`kernels::matmul_bf16`: the GEMM for a long prompt, the row kernel for a short
//! one and for a batch of decode steps); fewer rows and everything else stay f32. Against the
//! same bf16 weights computed in f32, the logits stay within bf16's rounding of the activations
//! (2⁻⁸ relative each, through a few layers: 1e-2 of the logits' spread here) and the greedy
//! token is the same; where the CPU has neither AMX nor AVX512_BF16 the engine computes in f32
//! and says so.

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

/// Each prompt prefilled in a step of its own (its last token's logits), then one decode step
/// of every sequence together (a batch of as many rows): each one's logits, and the compute
/// type the backend ran.
fn logits(model: &Arc<Model>, compute: ComputeDtype, prompts: &[Vec<u32>]) -> (Vec<Vec<f32>>, &'static str) {
    let opts =
        EngineOptions { block_tokens: 16, cache_budget_bytes: 16 << 20, compute_dtype: compute, ..Default::default() };
    let mut e = Engine::new(model.clone(), &opts);
    let mut out = Vec::new();
    for (seq, prompt) in (1..).zip(prompts) {
        e.add_sequence(seq).unwrap();
        out.push(e.step(&[StepItem::prefill(seq, prompt, Logits::Last)]).unwrap().remove(0).logits.into_vec());
    }
    let next: Vec<[u32; 1]> = prompts.iter().map(|p| [p[0]]).collect();
    let batch: Vec<StepItem> = (1..).zip(&next).map(|(seq, t)| StepItem::decode(seq, t)).collect();
    out.extend(e.step(&batch).unwrap().into_iter().map(|o| o.logits.into_vec()));
    (out, e.backend().compute_name())
}

/// Prompt lengths: the GEMM's rows, the row kernel's, and rows below `matmul_bf16::MIN_ROWS`
/// (f32); their decode steps make a batch of eight.
const LENS: [usize; 8] = [300, 40, 12, 9, 5, 3, 2, 1];

#[test]
fn bf16_products_stay_within_bf16_rounding_of_f32_ones() {
    for mixer in [SelfMixerKind::GatedRetention, SelfMixerKind::SlidingWindow { window: 16 }] {
        let tmp = tempfile::tempdir().unwrap();
        write_random_model(&small_config(mixer), StoreDtype::Bf16, 3, false, tmp.path()).unwrap();
        let model = Arc::new(Model::load(tmp.path()).unwrap());
        assert_eq!(model.weight_dtype(), "bf16");
        let prompts: Vec<Vec<u32>> = LENS.iter().map(|&n| tokens(n, 300, 9 + n as u64)).collect();
        let (want, f32_name) = (logits(&model, ComputeDtype::F32, &prompts).0, "f32");
        let (got, name) = logits(&model, ComputeDtype::Bf16, &prompts);
        let (auto, auto_name) = logits(&model, ComputeDtype::Auto, &prompts);
        assert_eq!(auto_name, name, "auto on bf16 weights is bf16");
        assert_eq!(auto, got);
        if !matmul_bf16::available() {
            assert_eq!(name, f32_name, "without AMX or AVX512_BF16 the products stay f32");
            assert_eq!(got, want);
            continue;
        }
        assert_eq!(name, "bf16");
        // Whether each result went through a bf16 product: its prompt's rows, or the batch's.
        let prefills = LENS.iter().map(|&n| (format!("prefill of {n}"), matmul_bf16::runs(n)));
        let decodes =
            LENS.iter().map(|&n| (format!("decode after {n}"), matmul_bf16::runs(n) || matmul_bf16::runs(LENS.len())));
        for ((got, want), (what, in_bf16)) in got.iter().zip(&want).zip(prefills.chain(decodes)) {
            if !in_bf16 {
                assert_eq!(got, want, "{mixer:?}, {what}: f32 throughout");
                continue;
            }
            assert_ne!(got, want, "{mixer:?}, {what}: the bf16 path ran");
            let spread = want.iter().fold(f32::MIN, |a, &b| a.max(b)) - want.iter().fold(f32::MAX, |a, &b| a.min(b));
            let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            eprintln!("{mixer:?}, {what}: max abs diff {worst} of a spread of {spread}");
            assert!(worst <= 1e-2 * spread, "{mixer:?}, {what}: max |Δ| {worst} of a spread of {spread}");
            assert_eq!(argmax(got), argmax(want), "{mixer:?}, {what}: the greedy token");
        }
    }
}
