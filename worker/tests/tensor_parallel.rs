//! Tensor parallelism: a group as a `tp × cp` grid of ranks on threads, talking over real TCP
//! sockets on loopback. Every grid from 1×1 to 2×2, and 4×1 and 1×4, on both mixers, must
//! give a single rank's greedy tokens and log-probabilities (f32, within 1e-4), with each
//! rank's weights about 1/tp of the model and its cache about 1/(tp·cp) of the whole.

mod common;

use std::sync::Arc;

use common::*;
use yoco_worker::config::{ModelConfig, SelfMixerKind};
use yoco_worker::engine::{Engine, EngineOptions, Logits, StepItem};
use yoco_worker::model::{Model, TpShard};
use yoco_worker::sampling::log_softmax;
use yoco_worker::weights::WeightDtype;

const TOL: f32 = 1e-4;

/// The engine tests' small shape with heads that split four ways: 4 self heads (head dim 16),
/// 8 query heads over 4 KV heads (head dim 8, groups of 2), FFN 96, and a vocabulary of 301
/// ids that no tp > 1 divides.
fn grid_config(mixer: SelfMixerKind) -> ModelConfig {
    let mut cfg = small_config(mixer);
    cfg.n_attn_heads = 8;
    cfg.n_attn_kv_heads = 4;
    cfg.vocab_size = 301;
    cfg
}

/// What one rank saw: the greedy tokens, their log-probabilities, every logits row, and what it
/// holds.
struct Run {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    logits: Vec<Vec<f32>>,
    shard_rows: usize,
    cache_bytes: usize,
    block_bytes: usize,
}

/// Prefills `prompt` in steps of 64 tokens (logits of every position), then generates `n`
/// tokens greedily.
fn greedy(engine: &mut Engine, prompt: &[u32], n: usize) -> Run {
    let vocab = engine.model().cfg.vocab_size;
    engine.add_sequence(1).unwrap();
    let mut logits: Vec<Vec<f32>> = Vec::new();
    for part in prompt.chunks(64) {
        let out = engine.step(&[StepItem::prefill(1, part, Logits::All)]).unwrap().remove(0);
        logits.extend(out.logits.chunks_exact(vocab).map(<[f32]>::to_vec));
    }
    let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let last = logits.last().unwrap();
        let token = argmax(last);
        tokens.push(token);
        logprobs.push(log_softmax(last)[token as usize]);
        let out = engine.step(&[StepItem::decode(1, &[token])]).unwrap().remove(0);
        logits.push(out.logits.into_vec());
    }
    Run {
        tokens,
        logprobs,
        logits,
        shard_rows: engine.sequence_shard_len(1).unwrap(),
        cache_bytes: engine.sequence_cache_bytes(1).unwrap(),
        block_bytes: engine.pool().block_bytes(),
    }
}

/// Runs `script` on a `tp × cp` grid: rank r holds `parts[r % tp]`.
fn run_grid<T: Send>(parts: &[Arc<Model>], cp: usize, script: &(dyn Fn(&mut Engine) -> T + Sync)) -> Vec<T> {
    let eo = EngineOptions { block_tokens: 16, cache_budget_bytes: 64 << 20, ..EngineOptions::default() };
    run_group_parts(parts, parts.len() * cp, &eo, script)
}

fn load_part(dir: &std::path::Path, rank: usize, size: usize) -> Arc<Model> {
    Arc::new(Model::load_sharded(dir, WeightDtype::Auto, TpShard { rank, size }).unwrap())
}

/// Runs greedy generation on a single rank and on each `(tp, cp)` grid of a random model of
/// `cfg`, and checks tokens, log-probabilities, logits and what each rank holds.
fn check_grids(cfg: &ModelConfig, grids: &[(usize, usize)]) {
    let dir = tempfile::tempdir().unwrap();
    let whole = random_model(cfg, 11, false, dir.path());
    let prompt = tokens(150, cfg.vocab_size, 5);
    let single = greedy(&mut Engine::new(whole.clone(), &grid_eo()), &prompt, 6);
    for &(tp, cp) in grids {
        let what = format!("{:?}, {} KV heads, tp {tp} × cp {cp}", cfg.mixer, cfg.n_attn_kv_heads);
        let parts: Vec<Arc<Model>> = (0..tp).map(|r| load_part(dir.path(), r, tp)).collect();
        // KV heads fewer than the ranks are copied, not split.
        let kv_split = tp.min(cfg.n_attn_kv_heads);
        let kv_bytes = 2 * cfg.kv_dim() * cfg.dim * 4; // the cross-decoder's k_proj and v_proj, f32
        for p in &parts {
            // Norm weights are not split: a rank holds a little over 1/tp.
            let expected = (whole.weight_bytes() - kv_bytes) / tp + kv_bytes / kv_split;
            let share = p.weight_bytes() as f64 / expected as f64;
            assert!((1.0..1.03).contains(&share), "{what}: a rank's weights are {share} of 1/tp of the model");
        }
        let ranks = run_grid(&parts, cp, &|e| greedy(e, &prompt, 6));
        for (r, run) in ranks.iter().enumerate() {
            assert_eq!(run.tokens, single.tokens, "{what} rank {r}: greedy tokens");
            for (i, (a, b)) in run.logprobs.iter().zip(&single.logprobs).enumerate() {
                assert!((a - b).abs() < TOL, "{what} rank {r} token {i}: logprob {a} vs {b}");
            }
            for (i, (a, b)) in run.logits.iter().zip(&single.logits).enumerate() {
                let err = rel_err(a, b);
                assert!(err < TOL, "{what} rank {r} row {i}: rel err {err:e}");
                assert_eq!(a, &ranks[0].logits[i], "{what}: rank {r} disagrees with rank 0 at row {i}");
            }
            // A rank's cache: its KV heads (1/tp of a row) of its column's positions (1/cp).
            assert_eq!(run.block_bytes * kv_split, single.block_bytes, "{what}");
        }
        let total = prompt.len() + 6;
        let column: usize = ranks.iter().step_by(tp).map(|r| r.shard_rows).sum();
        assert_eq!(column, total, "{what}: one column's shards hold every position once");
        for run in &ranks {
            assert!(run.shard_rows.abs_diff(total / cp) <= 1, "{what}: unbalanced shards");
            // Whole blocks of 16 positions: a shard rounds up by less than one block.
            let whole_cache = single.block_bytes * total.div_ceil(16);
            let bound = whole_cache / (kv_split * cp) + run.block_bytes;
            assert!(run.cache_bytes <= bound, "{what}: a rank's cache {} > {bound}", run.cache_bytes);
        }
    }
}

#[test]
fn every_grid_gives_one_ranks_tokens_and_logprobs() {
    let grids = [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (1, 4)];
    for mixer in [SelfMixerKind::GatedRetention, SelfMixerKind::SlidingWindow { window: 8 }] {
        check_grids(&grid_config(mixer), &grids);
    }
}

#[test]
fn kv_heads_fewer_than_the_ranks_are_copied() {
    // MQA (the presets' tiny shape) on two ranks per row, and 2 KV heads on four.
    let mut cfg = grid_config(SelfMixerKind::GatedRetention);
    cfg.n_attn_kv_heads = 1;
    check_grids(&cfg, &[(2, 1), (2, 2)]);
    cfg.n_attn_kv_heads = 2;
    check_grids(&cfg, &[(4, 1)]);
}

#[test]
fn a_batch_mixing_prefill_and_decode_matches_on_a_two_by_two_grid() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = grid_config(SelfMixerKind::GatedRetention);
    let whole = random_model(&cfg, 3, true, dir.path());
    let (a, b) = (tokens(90, cfg.vocab_size, 1), tokens(40, cfg.vocab_size, 2));
    // Sequence 1 prefills, then decodes while sequence 2 prefills in the same steps.
    let script = |e: &mut Engine| {
        e.add_sequence(1).unwrap();
        e.add_sequence(2).unwrap();
        let mut out = e.step(&[StepItem::prefill(1, &a, Logits::Last)]).unwrap().remove(0).logits.into_vec();
        for part in b.chunks(20) {
            let token = argmax(&out[out.len() - cfg.vocab_size..]);
            let step = e.step(&[StepItem::prefill(2, part, Logits::Last), StepItem::decode(1, &[token])]).unwrap();
            out = step[1].logits.to_vec();
            out.extend(step[0].logits.iter());
        }
        out
    };
    let single = script(&mut Engine::new(whole, &grid_eo()));
    let parts: Vec<Arc<Model>> = (0..2).map(|r| load_part(dir.path(), r, 2)).collect();
    for (r, got) in run_grid(&parts, 2, &script).iter().enumerate() {
        let err = rel_err(got, &single);
        assert!(err < TOL, "tied embeddings, 2×2 rank {r}: rel err {err:e}");
    }
}

#[test]
fn a_split_the_model_does_not_allow_names_the_constraint() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = grid_config(SelfMixerKind::GatedRetention);
    cfg.n_attn_kv_heads = 2;
    cfg.hidden_dim = 98;
    random_model(&cfg, 1, false, dir.path());
    let err = Model::load_sharded(dir.path(), WeightDtype::Auto, TpShard { rank: 0, size: 4 }).err().unwrap();
    assert!(err.to_string().contains("hidden_dim (98)"), "{err}");
    let err = Model::load_sharded(dir.path(), WeightDtype::Auto, TpShard { rank: 0, size: 3 }).err().unwrap();
    assert!(err.to_string().contains("n_self_heads"), "{err}");
    // A group whose size tp does not divide, or ranks holding each other's weights.
    let parts = [load_part(dir.path(), 1, 2), load_part(dir.path(), 0, 2)];
    let eo = grid_eo();
    for (r, got) in try_run_group_parts(&parts[..1], 3, &eo, &|_| ()).into_iter().enumerate() {
        let err = got.err().unwrap().to_string();
        assert!(err.contains("tensor-parallel size 2 does not divide the 3 ranks"), "rank {r}: {err}");
    }
    for (r, got) in try_run_group_parts(&parts, 2, &eo, &|_| ()).into_iter().enumerate() {
        let err = got.err().unwrap().to_string();
        assert!(err.contains(&format!("holds the weights of rank {}", 1 - r)), "rank {r}: {err}");
    }
}

fn grid_eo() -> EngineOptions {
    EngineOptions { block_tokens: 16, cache_budget_bytes: 64 << 20, ..EngineOptions::default() }
}
