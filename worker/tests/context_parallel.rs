//! Context parallelism in one process: P ranks on threads, talking over real TCP sockets on
//! loopback, must give the single-rank engine's logits (rel 1e-4) and identical logits on every
//! rank, with the global cache split by position between them.

mod common;

use std::sync::Arc;

use common::*;
use yoco_worker::engine::{Engine, Logits, StepItem};
use yoco_worker::model::Model;

const TOL: f32 = 1e-4;

/// What one run returns: every logits row produced, in order, and the rank's shard sizes.
struct RunResult {
    logits: Vec<Vec<f32>>,
    shard_rows: Vec<usize>,
}

/// Prefill `prompt` in steps of `step` tokens (logits of every position), then decode greedily.
fn prefill_then_decode(engine: &mut Engine, prompt: &[u32], step: usize, decode: usize) -> RunResult {
    engine.add_sequence(1).unwrap();
    let mut logits = Vec::new();
    for part in prompt.chunks(step) {
        let out = engine.step(&[StepItem::prefill(1, part, Logits::All)]).unwrap();
        let vocab = engine.model().cfg.vocab_size;
        logits.extend(out[0].logits.chunks(vocab).map(<[f32]>::to_vec));
    }
    for _ in 0..decode {
        let token = argmax(logits.last().unwrap());
        let out = engine.step(&[StepItem::decode(1, &[token])]).unwrap();
        logits.push(out[0].logits.to_vec());
    }
    RunResult { logits, shard_rows: vec![engine.sequence_shard_len(1).unwrap()] }
}

fn check(name: &str, world: usize, single: &RunResult, ranks: &[RunResult]) {
    for (r, res) in ranks.iter().enumerate() {
        assert_eq!(res.logits.len(), single.logits.len());
        for (i, (a, b)) in res.logits.iter().zip(&single.logits).enumerate() {
            let err = rel_err(a, b);
            assert!(err < TOL, "{name} P={world} rank {r} row {i}: rel err {err}");
            assert_eq!(a, &ranks[0].logits[i], "{name} P={world}: ranks disagree at row {i}");
        }
    }
}

#[test]
fn one_to_four_ranks_match_one_process() {
    for name in ["gret", "swa", "swa_f16"] {
        let model = load(name);
        let prompt = expected(name).prompt;
        // Steps longer and shorter than the window (W = 5 or 3), prompts shorter than one
        // chunk per rank, several steps per prompt.
        for (len, step) in [(300usize, 300usize), (300, 64), (37, 10), (3, 3), (2, 8), (1, 1)] {
            let prompt = &prompt[..len.min(prompt.len())];
            let script = |e: &mut Engine| prefill_then_decode(e, prompt, step, 4);
            let single = script(&mut engine(&model, 16));
            for world in 1..=4 {
                let ranks = run_group(&model, world, &script);
                check(&format!("{name} len {len} step {step}"), world, &single, &ranks);
                let rows: usize = ranks.iter().map(|r| r.shard_rows[0]).sum();
                assert_eq!(rows, prompt.len() + 4, "{name}: shards must add up to the whole cache");
                if step >= len {
                    // One prefill step: each rank holds about len / world rows (+ decode tokens).
                    for r in &ranks {
                        assert!(r.shard_rows[0] <= len.div_ceil(world) + 4, "{name}: unbalanced shards");
                    }
                }
            }
        }
    }
}

#[test]
fn long_window_and_concurrent_sequences() {
    use yoco_worker::config::SelfMixerKind;
    use yoco_worker::presets::{write_random_model, Preset, StoreDtype};
    let dir = tempfile::tempdir().unwrap();
    for (i, window) in [Some(40), None].into_iter().enumerate() {
        let mut cfg = Preset::Tiny.config();
        (cfg.dim, cfg.hidden_dim, cfg.vocab_size, cfg.n_attn_kv_heads) = (64, 96, 500, 2);
        if let Some(w) = window {
            cfg.mixer = SelfMixerKind::SlidingWindow { window: w };
        }
        let path = dir.path().join(format!("m{i}"));
        write_random_model(&cfg, StoreDtype::F32, 3, false, &path).unwrap();
        let model = Arc::new(Model::load(&path).unwrap());
        let a: Vec<u32> = (0..123).map(|t| (t * 37 % 500) as u32).collect();
        let b: Vec<u32> = (0..50).map(|t| (t * 11 % 500) as u32).collect();
        // Sequence 1 prefills in steps of 30 (chunks shorter than the window) while sequence 2,
        // already prefilled, decodes in the same steps.
        let script = |e: &mut Engine| {
            e.add_sequence(1).unwrap();
            e.add_sequence(2).unwrap();
            let mut logits = Vec::new();
            let mut last_b = e.step(&[StepItem::prefill(2, &b, Logits::Last)]).unwrap().remove(0).logits.into_vec();
            for part in a.chunks(30) {
                let token = argmax(&last_b);
                let out = e.step(&[StepItem::prefill(1, part, Logits::Last), StepItem::decode(2, &[token])]).unwrap();
                logits.push(out[0].logits.to_vec());
                last_b = out[1].logits.to_vec();
                logits.push(last_b.clone());
            }
            RunResult { logits, shard_rows: vec![e.sequence_shard_len(1).unwrap(), e.sequence_shard_len(2).unwrap()] }
        };
        let single = script(&mut engine(&model, 16));
        for world in [2, 3] {
            let ranks = run_group(&model, world, &script);
            check(&format!("window {window:?}"), world, &single, &ranks);
            let total: usize = ranks.iter().map(|r| r.shard_rows[1]).sum();
            assert_eq!(total, b.len() + a.chunks(30).count());
        }
    }
}
