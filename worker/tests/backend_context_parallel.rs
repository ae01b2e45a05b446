//! Context parallelism on the backend forward pass (`Forward::with_group`): P ranks on threads,
//! over real TCP sockets on loopback, each running the backend's ops on its chunk of every
//! prompt and keeping its shard of the global cache. Every rank must give the single-rank CPU
//! engine's logits (rel 1e-4, the tolerance of the engine's own context-parallel tests) and the
//! same logits as every other rank; the shards must add up to the whole cache.
//!
//! The CPU backend runs here; the CUDA backend's kernels for the same ops are checked in the
//! emulator (`gpu_backend_emulated.rs`), and on a GPU by `scripts/gpu-check.sh`.

mod common;

use std::sync::Arc;

use common::*;
use yoco_worker::backend::cpu::CpuBackend;
use yoco_worker::backend::runner::ForwardRunner;
use yoco_worker::backend::{Forward, ForwardError, ForwardOptions};
use yoco_worker::config::SelfMixerKind;
use yoco_worker::engine::{Engine, Logits, StepItem};
use yoco_worker::executor::Plan;
use yoco_worker::kernels::kv_block::CacheDtype;
use yoco_worker::model::Model;

const TOL: f32 = 1e-4;

fn opts() -> ForwardOptions {
    ForwardOptions {
        cache_dtype: CacheDtype::F32,
        block_tokens: 16,
        cache_tokens: 4096,
        chunk_tokens: 64,
        max_sequences: 4,
    }
}

/// Every logits row of a prompt prefilled in steps of `step` (all positions' logits), then of
/// `decode` greedy tokens; and this rank's cache rows.
fn forward_script<B: yoco_worker::backend::Backend>(
    fwd: &mut Forward<B>,
    prompt: &[u32],
    step: usize,
    decode: usize,
) -> (Vec<Vec<f32>>, usize) {
    let vocab = fwd.config().vocab_size;
    let mut seq = fwd.new_sequence().unwrap();
    let mut logits = Vec::new();
    for part in prompt.chunks(step) {
        let out = fwd.prefill(&mut seq, part, None, Logits::All).unwrap();
        logits.extend(out.chunks(vocab).map(<[f32]>::to_vec));
    }
    for _ in 0..decode {
        let token = argmax(logits.last().unwrap());
        logits.push(fwd.decode(&mut [&mut seq], &[token]).unwrap());
    }
    (logits, seq.shard_rows())
}

/// The single-rank CPU engine's rows for the same script.
fn engine_script(model: &Arc<Model>, prompt: &[u32], step: usize, decode: usize) -> Vec<Vec<f32>> {
    let mut e = engine(model, 16);
    e.add_sequence(1).unwrap();
    let vocab = model.cfg.vocab_size;
    let mut logits = Vec::new();
    for part in prompt.chunks(step) {
        let out = e.step(&[StepItem::prefill(1, part, Logits::All)]).unwrap();
        logits.extend(out[0].logits.chunks(vocab).map(<[f32]>::to_vec));
    }
    for _ in 0..decode {
        let token = argmax(logits.last().unwrap());
        logits.push(e.step(&[StepItem::decode(1, &[token])]).unwrap().remove(0).logits.into_vec());
    }
    logits
}

fn check_ranks(what: &str, want: &[Vec<f32>], ranks: &[Vec<Vec<f32>>]) {
    for (r, got) in ranks.iter().enumerate() {
        assert_eq!(got.len(), want.len(), "{what}: rows");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            let err = rel_err(a, b);
            assert!(err < TOL, "{what} rank {r} row {i}: rel err {err}");
            assert_eq!(a, &ranks[0][i], "{what}: ranks disagree at row {i}");
        }
    }
}

#[test]
fn forward_groups_of_one_to_four_ranks_are_the_single_rank_engine() {
    for name in ["gret", "swa", "swa_f16"] {
        let model = load(name);
        let prompt = expected(name).prompt;
        // Steps longer and shorter than the window (W = 5 or 3), prompts shorter than one
        // token per rank, several steps per prompt.
        for (len, step) in [(300usize, 300usize), (300, 64), (37, 10), (3, 3), (2, 8), (1, 1)] {
            let prompt = &prompt[..len.min(prompt.len())];
            let want = engine_script(&model, prompt, step, 4);
            for world in 1..=4 {
                let ranks = run_forward_group(&model, world, &opts(), &|| CpuBackend, &|fwd| {
                    forward_script(fwd, prompt, step, 4)
                });
                let what = format!("{name} len {len} step {step} P={world}");
                let logits: Vec<_> = ranks.iter().map(|(l, _)| l.clone()).collect();
                check_ranks(&what, &want, &logits);
                let rows: usize = ranks.iter().map(|(_, rows)| rows).sum();
                assert_eq!(rows, prompt.len() + 4, "{what}: shards must add up to the whole cache");
            }
        }
    }
}

/// Explicit, uneven cuts (empty ranks first, in the middle and last), only the last token's
/// logits, and half-precision caches.
#[test]
fn uneven_cuts_and_half_caches() {
    for mixer in [SelfMixerKind::GatedRetention, SelfMixerKind::SlidingWindow { window: 8 }] {
        let tmp = tempfile::tempdir().unwrap();
        let model = random_model(&small_config(mixer), 3, false, tmp.path());
        let prompt = tokens(45, 300, 5);
        for dtype in [CacheDtype::F32, CacheDtype::Bf16] {
            let o = ForwardOptions { cache_dtype: dtype, ..opts() };
            let mut single = Forward::new(CpuBackend, &model, o.clone()).unwrap();
            let mut seq = single.new_sequence().unwrap();
            let mut want = Vec::new();
            for part in prompt.chunks(15) {
                want.push(single.prefill(&mut seq, part, None, Logits::Last).unwrap());
            }
            want.push(single.decode(&mut [&mut seq], &[9]).unwrap());
            let cuts: [&[usize]; 3] = [&[0, 0, 7], &[0, 15, 15], &[0, 2, 3]];
            let ranks = run_forward_group(&model, 3, &o, &|| CpuBackend, &|fwd| {
                let mut seq = fwd.new_sequence().unwrap();
                let mut got = Vec::new();
                for (part, cut) in prompt.chunks(15).zip(cuts) {
                    got.push(fwd.prefill(&mut seq, part, Some(cut), Logits::Last).unwrap());
                }
                // A cut for the wrong number of ranks is refused on every rank alike.
                let bad = fwd.prefill(&mut seq, &prompt[..4], Some(&[0, 2]), Logits::Last);
                assert!(matches!(bad, Err(ForwardError::BadSplit(_))), "{bad:?}");
                got.push(fwd.decode(&mut [&mut seq], &[9]).unwrap());
                // The exchanges were timed (the worker reports it per step), and taking resets.
                assert!(fwd.take_collective_time() > std::time::Duration::ZERO);
                assert_eq!(fwd.take_collective_time(), std::time::Duration::ZERO);
                got
            });
            check_ranks(&format!("{mixer:?} {dtype:?}"), &want, &ranks);
        }
    }
}

/// A snapshot taken where the ranks' shards end inside cache blocks: the sequence that took it
/// and one resumed from it both go on as a fresh sequence would (copy-on-write of the shared
/// partial blocks), while other sequences decode in the same batches.
#[test]
fn snapshots_with_partial_blocks_and_batched_decode() {
    for mixer in [SelfMixerKind::GatedRetention, SelfMixerKind::SlidingWindow { window: 8 }] {
        let tmp = tempfile::tempdir().unwrap();
        let model = random_model(&small_config(mixer), 7, false, tmp.path());
        let vocab = model.cfg.vocab_size;
        let (shared, rest_a, rest_b) = (tokens(64, 300, 1), tokens(11, 300, 2), tokens(6, 300, 3));
        let script = |fwd: &mut Forward<CpuBackend>| {
            let mut a = fwd.new_sequence().unwrap();
            fwd.prefill(&mut a, &shared, None, Logits::None).unwrap();
            let snap = fwd.snapshot(&a).unwrap();
            let la = fwd.prefill(&mut a, &rest_a, None, Logits::Last).unwrap();
            let mut b = fwd.new_sequence_from(&snap).unwrap();
            let lb = fwd.prefill(&mut b, &rest_b, None, Logits::Last).unwrap();
            let mut rows = vec![la.clone(), lb.clone()];
            let (mut ta, mut tb) = (argmax(&la), argmax(&lb));
            for _ in 0..5 {
                let out = fwd.decode(&mut [&mut a, &mut b], &[ta, tb]).unwrap();
                let (ra, rb) = out.split_at(vocab);
                (ta, tb) = (argmax(ra), argmax(rb));
                rows.extend([ra.to_vec(), rb.to_vec()]);
            }
            fwd.free(a);
            fwd.free(b);
            fwd.drop_snapshot(snap);
            assert_eq!(fwd.free_blocks(), 4096 / 16, "every block came back");
            rows
        };
        let mut single = Forward::new(CpuBackend, &model, opts()).unwrap();
        let want = script(&mut single);
        // The same as sequences prefilled from scratch, one rank.
        let mut fresh = Forward::new(CpuBackend, &model, opts()).unwrap();
        let mut b = fresh.new_sequence().unwrap();
        fresh.prefill(&mut b, &shared, None, Logits::None).unwrap();
        assert_close(&fresh.prefill(&mut b, &rest_b, None, Logits::Last).unwrap(), &want[1], 1e-5, "resumed");
        for world in [2, 3] {
            let ranks = run_forward_group(&model, world, &opts(), &|| CpuBackend, &script);
            check_ranks(&format!("{mixer:?} P={world}"), &want, &ranks);
        }
    }
}

/// The runner of a group serves the coordinator's plans as the CPU engine's executor does
/// (sampling, penalties, prompt log-probabilities, a snapshot resumed, batched decode, frees):
/// rank 0's results are checked, with every rank's cache rows adding up to the executor's.
#[test]
fn forward_runner_groups_serve_plans_as_the_executor_does() {
    use std::sync::mpsc;
    use yoco_worker::executor::SeqResult;
    for mixer in [SelfMixerKind::GatedRetention, SelfMixerKind::SlidingWindow { window: 8 }] {
        let tmp = tempfile::tempdir().unwrap();
        let model = random_model(&small_config(mixer), 9, false, tmp.path());
        let world = 3;
        // Rank 0's thread drives the plans; the others receive each plan and send back their
        // results. Each thread takes its channel ends, so that a rank that fails drops them and
        // the others stop waiting.
        let (plan_txs, plan_rxs): (Vec<_>, Vec<_>) = (1..world).map(|_| mpsc::channel::<Plan>()).unzip();
        let (res_tx, res_rx) = mpsc::channel::<Vec<SeqResult>>();
        let plan_txs = std::sync::Mutex::new(Some(plan_txs));
        let peer_ends: Vec<_> =
            plan_rxs.into_iter().map(|rx| std::sync::Mutex::new(Some((rx, res_tx.clone())))).collect();
        drop(res_tx);
        let res_rx = std::sync::Mutex::new(Some(res_rx));
        tcp_group(world, &|rank, comm| {
            let mut runner = ForwardRunner::new(Forward::with_group(CpuBackend, &model, opts(), comm).unwrap());
            if rank > 0 {
                let (rx, tx) = peer_ends[rank - 1].lock().unwrap().take().unwrap();
                while let Ok(plan) = rx.recv() {
                    tx.send(runner.execute(&plan).unwrap()).unwrap();
                }
                return;
            }
            let plan_txs = plan_txs.lock().unwrap().take().unwrap();
            let rx = res_rx.lock().unwrap().take().unwrap();
            assert_plans_agree(
                &model,
                16,
                &mut |plan| {
                    for tx in &plan_txs {
                        tx.send(plan.clone()).unwrap();
                    }
                    let mut mine = runner.execute(plan).unwrap();
                    for _ in 1..world {
                        let theirs = rx.recv().unwrap();
                        for (m, t) in mine.iter_mut().zip(theirs) {
                            assert_eq!(m.seq, t.seq);
                            assert_eq!(m.sampled.as_ref().map(|s| s.token), t.sampled.as_ref().map(|s| s.token));
                            m.shard_tokens += t.shard_tokens;
                        }
                    }
                    mine
                },
                1e-4,
            );
        });
    }
}

/// A rank whose cache is full refuses the step, and so does every other rank, without changing
/// anything; the group then serves on.
#[test]
fn a_full_shard_on_one_rank_refuses_the_step_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&small_config(SelfMixerKind::GatedRetention), 5, false, tmp.path());
    let ranks = tcp_group(2, &|rank, comm| {
        // Rank 1 has room for 2 blocks (32 rows), rank 0 for 16.
        let cache_tokens = if rank == 1 { 32 } else { 256 };
        let mut fwd = Forward::with_group(CpuBackend, &model, ForwardOptions { cache_tokens, ..opts() }, comm).unwrap();
        let mut seq = fwd.new_sequence().unwrap();
        // 80 tokens cut [0, 10): rank 1 would need 70 rows.
        let refused = fwd.prefill(&mut seq, &tokens(80, 300, 1), Some(&[0, 10]), Logits::Last);
        let refused = refused.map(drop);
        let after = (seq.len(), seq.shard_rows(), fwd.free_blocks());
        let ok = fwd.prefill(&mut seq, &tokens(40, 300, 2), None, Logits::Last).unwrap();
        (format!("{refused:?}"), after, ok)
    });
    assert!(ranks[0].0.contains("PeerRefused") && ranks[0].0.contains("rank: 1"), "{}", ranks[0].0);
    assert!(ranks[1].0.contains("CacheFull"), "{}", ranks[1].0);
    assert_eq!((ranks[0].1, ranks[1].1), ((0, 0, 16), (0, 0, 2)), "the refused step changed nothing");
    assert_eq!(ranks[0].2, ranks[1].2);
    let mut e = Engine::new(model.clone(), &yoco_worker::engine::EngineOptions::default());
    e.add_sequence(1).unwrap();
    let want = e.step(&[StepItem::prefill(1, &tokens(40, 300, 2), Logits::Last)]).unwrap().remove(0).logits;
    assert_close(&ranks[0].2, &want, TOL, "after the refusal");
}

/// A rank lost mid-step is an error on the others, not a hang, and leaves them broken: every
/// later step fails at once until the group is formed again.
#[test]
fn a_lost_rank_breaks_the_group_with_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&small_config(SelfMixerKind::SlidingWindow { window: 8 }), 5, false, tmp.path());
    let started = std::time::Instant::now();
    let ranks = tcp_group(2, &|rank, comm| {
        let mut fwd = Forward::with_group(CpuBackend, &model, opts(), comm).unwrap();
        let mut seq = fwd.new_sequence().unwrap();
        fwd.prefill(&mut seq, &tokens(30, 300, 1), None, Logits::Last).unwrap();
        if rank == 1 {
            return None; // gone: its sockets close with its forward pass
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let lost = fwd.prefill(&mut seq, &tokens(30, 300, 2), None, Logits::Last).map(drop);
        let again = fwd.decode(&mut [&mut seq], &[1]).map(drop);
        Some((format!("{lost:?}"), format!("{again:?}"), fwd.broken().is_some()))
    });
    let (lost, again, broken) = ranks[0].clone().unwrap();
    assert!(lost.contains("Comm") && again.contains("Comm") && broken, "{lost} / {again}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "an error, not the collective timeout");
}
