//! A context-parallel group's steps beyond plain prefill and decode (those are in
//! `context_parallel.rs`): uneven cuts with empty ranks, half-precision caches, prefix snapshots
//! whose shards end inside blocks, the coordinator's plans, a full shard on one rank and a lost
//! rank. P ranks on threads over real TCP sockets on loopback; every rank must give the
//! single-rank engine's logits (rel 1e-4) and the same bits as every other rank.

mod common;

use common::*;
use yoco_worker::config::SelfMixerKind;
use yoco_worker::engine::{Engine, EngineError, EngineOptions, Logits, Placement, StepItem};
use yoco_worker::kernels::kv_block::CacheDtype;
use yoco_worker::plan::Plan;

const TOL: f32 = 1e-4;

fn opts() -> EngineOptions {
    EngineOptions { block_tokens: 16, cache_budget_bytes: 4096 * 2 * 16 * 4, ..EngineOptions::default() }
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

fn last(e: &mut Engine, items: &[StepItem]) -> Vec<Vec<f32>> {
    e.step(items).unwrap().into_iter().map(|o| o.logits.into_vec()).collect()
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
            let o = EngineOptions { cache_dtype: dtype, ..opts() };
            let cuts: [&[usize]; 3] = [&[0, 0, 7], &[0, 15, 15], &[0, 2, 3]];
            let script = |e: &mut Engine, cut: bool| {
                e.add_sequence(1).unwrap();
                let mut got = Vec::new();
                for (part, starts) in prompt.chunks(15).zip(cuts) {
                    let placement = Placement::Sharded(cut.then(|| starts.to_vec()));
                    got.extend(last(e, &[StepItem { seq: 1, tokens: part, logits: Logits::Last, placement }]));
                }
                got.extend(last(e, &[StepItem::decode(1, &[9])]));
                got
            };
            let want = script(&mut Engine::new(model.clone(), &o), false);
            let ranks = run_group_with(&model, 3, &o, &|e| {
                let got = script(e, true);
                // A cut for the wrong number of ranks is refused on every rank alike.
                let placement = Placement::Sharded(Some(vec![0, 2]));
                let bad = e.step(&[StepItem { seq: 1, tokens: &prompt[..4], logits: Logits::Last, placement }]);
                assert!(matches!(bad, Err(EngineError::BadSplit { .. })), "{bad:?}");
                // The exchanges were timed (the worker reports it per step), and taking resets.
                assert!(e.take_collective_seconds() > 0.0);
                assert_eq!(e.take_collective_seconds(), 0.0);
                got
            });
            check_ranks(&format!("{mixer:?} {dtype:?}"), &want, &ranks);
        }
    }
}

/// A snapshot taken where the ranks' shards end inside cache blocks: the sequence that took it
/// and one resumed from it both go on as a fresh sequence would (copy-on-write of the shared
/// partial blocks), while they decode in the same batches.
#[test]
fn snapshots_with_partial_blocks_and_batched_decode() {
    for mixer in [SelfMixerKind::GatedRetention, SelfMixerKind::SlidingWindow { window: 8 }] {
        let tmp = tempfile::tempdir().unwrap();
        let model = random_model(&small_config(mixer), 7, false, tmp.path());
        let (shared, rest_a, rest_b) = (tokens(64, 300, 1), tokens(11, 300, 2), tokens(6, 300, 3));
        let script = |e: &mut Engine| {
            e.add_sequence(1).unwrap();
            e.step(&[StepItem::prefill(1, &shared, Logits::None)]).unwrap();
            e.snapshot(1, 70).unwrap();
            let la = last(e, &[StepItem::prefill(1, &rest_a, Logits::Last)]).remove(0);
            e.add_sequence_from(2, 70).unwrap();
            let lb = last(e, &[StepItem::prefill(2, &rest_b, Logits::Last)]).remove(0);
            let mut rows = vec![la.clone(), lb.clone()];
            let (mut ta, mut tb) = (argmax(&la), argmax(&lb));
            for _ in 0..5 {
                let out = last(e, &[StepItem::decode(1, &[ta]), StepItem::decode(2, &[tb])]);
                (ta, tb) = (argmax(&out[0]), argmax(&out[1]));
                rows.extend(out);
            }
            e.free_sequence(1);
            e.free_sequence(2);
            e.drop_snapshot(70);
            assert_eq!(e.pool().used_blocks(), 0, "every block came back");
            rows
        };
        let want = script(&mut Engine::new(model.clone(), &opts()));
        // The same as a sequence prefilled from scratch, one rank.
        let mut fresh = Engine::new(model.clone(), &opts());
        fresh.add_sequence(2).unwrap();
        let whole: Vec<u32> = shared.iter().chain(&rest_b).copied().collect();
        assert_close(&last(&mut fresh, &[StepItem::prefill(2, &whole, Logits::Last)])[0], &want[1], 1e-5, "resumed");
        for world in [2, 3] {
            let ranks = run_group_with(&model, world, &opts(), &script);
            check_ranks(&format!("{mixer:?} P={world}"), &want, &ranks);
        }
    }
}

/// A group's executors serve the coordinator's plans as one rank's executor does (sampling,
/// penalties, prompt log-probabilities, a snapshot resumed, batched decode, frees): rank 0's
/// results are checked, with every rank's cache rows adding up to the one rank's.
#[test]
fn groups_serve_plans_as_one_rank_does() {
    use std::sync::mpsc;
    use yoco_worker::executor::Executor;
    use yoco_worker::plan::SeqResult;
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
            let mut x = Executor::new(Engine::with_group(model.clone(), &opts(), comm).unwrap());
            if rank > 0 {
                let (rx, tx) = peer_ends[rank - 1].lock().unwrap().take().unwrap();
                while let Ok(plan) = rx.recv() {
                    tx.send(x.execute(&plan).unwrap()).unwrap();
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
                    let mut mine = x.execute(plan).unwrap();
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
    let block_bytes = 16 * 2 * 16 * 4;
    let ranks = tcp_group(2, &|rank, comm| {
        // Rank 1 has room for 2 blocks (32 rows), rank 0 for 16.
        let blocks = if rank == 1 { 2 } else { 16 };
        let o = EngineOptions { cache_budget_bytes: blocks * block_bytes, ..opts() };
        let mut e = Engine::with_group(model.clone(), &o, comm).unwrap();
        e.add_sequence(1).unwrap();
        // 80 tokens cut [0, 10): rank 1 would need 70 rows.
        let placement = Placement::Sharded(Some(vec![0, 10]));
        let refused = e.step(&[StepItem { seq: 1, tokens: &tokens(80, 300, 1), logits: Logits::Last, placement }]);
        let refused = refused.map(drop);
        let after = (e.sequence_len(1).unwrap(), e.sequence_shard_len(1).unwrap(), e.pool().free_blocks());
        let ok = last(&mut e, &[StepItem::prefill(1, &tokens(40, 300, 2), Logits::Last)]).remove(0);
        (format!("{refused:?}"), after, ok)
    });
    assert!(ranks[0].0.contains("PeerRefused") && ranks[0].0.contains("rank: 1"), "{}", ranks[0].0);
    assert!(ranks[1].0.contains("OutOfBudget"), "{}", ranks[1].0);
    assert_eq!((ranks[0].1, ranks[1].1), ((0, 0, 16), (0, 0, 2)), "the refused step changed nothing");
    assert_eq!(ranks[0].2, ranks[1].2);
    let mut e = Engine::new(model.clone(), &opts());
    e.add_sequence(1).unwrap();
    let want = last(&mut e, &[StepItem::prefill(1, &tokens(40, 300, 2), Logits::Last)]).remove(0);
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
        let mut e = Engine::with_group(model.clone(), &opts(), comm).unwrap();
        e.add_sequence(1).unwrap();
        e.step(&[StepItem::prefill(1, &tokens(30, 300, 1), Logits::Last)]).unwrap();
        if rank == 1 {
            return None; // gone: its sockets close with its engine
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let lost = e.step(&[StepItem::prefill(1, &tokens(30, 300, 2), Logits::Last)]).map(drop);
        let again = e.step(&[StepItem::decode(1, &[1])]).map(drop);
        Some((format!("{lost:?}"), format!("{again:?}"), e.broken().is_some()))
    });
    let (lost, again, broken) = ranks[0].clone().unwrap();
    assert!(lost.contains("Comm") && again.contains("Comm") && broken, "{lost} / {again}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "an error, not the collective timeout");
}
