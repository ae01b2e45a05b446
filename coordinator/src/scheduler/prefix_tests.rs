//! The prefix cache through the scheduler and a real engine: a request resumed from a snapshot
//! gives the tokens and log-probabilities it gives without the cache (greedy, seeded sampling,
//! penalties; both mixers), and a small cache budget evicts snapshots instead of refusing or
//! overcommitting. Chunk boundaries differ between the cached and the fresh run, so
//! log-probabilities agree to f32 rounding (1e-4 absolute), tokens exactly.

use std::sync::Arc;

use yoco_worker::model::Model;
use yoco_worker::sampling::SamplingParams;

use super::tests::{
    alone_generation, collect, fixture, futures_all, prompt, request, sequences, start_model, start_with_disk,
    wait_until, Outcome,
};
use super::*;
use crate::scheduler::event::End;
use crate::scheduler::request::GenRequest;

const TOL: f32 = 1e-4;

fn config(enabled: bool) -> SchedulerConfig {
    SchedulerConfig {
        max_batch_tokens: 256,
        prefill_chunk: 64,
        prefix: PrefixConfig { enabled, snapshot_interval: 32, ..PrefixConfig::default() },
        ..SchedulerConfig::default()
    }
}

fn cached(o: &Outcome) -> u64 {
    o.finished.as_ref().expect("finished").usage.cached_prompt_tokens as u64
}

fn assert_same(model: &Arc<Model>, req: &GenRequest, o: &Outcome, what: &str) {
    let failed = o.finished.as_ref().filter(|f| matches!(f.end, End::Failed(_) | End::Cancelled(_)));
    assert!(failed.is_none(), "{what}: {failed:?}");
    let want = alone_generation(model, req);
    assert_eq!(o.tokens, want.tokens, "{what}: tokens");
    assert_eq!(o.logprobs.len(), want.logprobs.len(), "{what}");
    for (i, (a, b)) in o.logprobs.iter().zip(&want.logprobs).enumerate() {
        assert!((a - b).abs() <= TOL, "{what}: logprob {i}: {a} vs {b}");
    }
}

fn join(a: &[u32], b: &[u32]) -> Vec<u32> {
    a.iter().chain(b).copied().collect()
}

async fn cached_requests_match_fresh_ones(mixer: &str) {
    let model = fixture(mixer);
    let s = start_model(model.clone(), config(true), 1000, None);
    let base = prompt(100, 1);
    let greedy = SamplingParams::default();
    let seeded = SamplingParams { temperature: 0.9, top_p: 0.95, seed: 5, ..SamplingParams::default() };
    let penalised = SamplingParams { repetition_penalty: 1.3, frequency_penalty: 0.5, ..SamplingParams::default() };
    // (what, request, the prompt tokens it should resume at). Snapshots come every 32 tokens and
    // at a prompt's last block boundary before its last token.
    let cases: Vec<(&str, GenRequest, u64)> = vec![
        ("first", request(base.clone(), 6, greedy.clone()), 0),
        ("exact repeat", request(base.clone(), 6, greedy.clone()), 96),
        ("seeded repeat", request(base.clone(), 6, seeded), 96),
        ("penalties on a repeat", request(base.clone(), 6, penalised), 96),
        // Shares 70 tokens: the match ends inside block 4, the snapshot at 64 is used.
        ("shared prefix, match inside a block", request(join(&base[..70], &prompt(30, 9)), 6, greedy.clone()), 64),
        // Shares 50: blocks 0-2 match, but the latest snapshot in them is at 32.
        ("match past the last snapshot", request(join(&base[..50], &prompt(20, 8)), 6, greedy.clone()), 32),
        ("longer prompt", request(join(&base, &prompt(60, 7)), 6, greedy.clone()), 96),
        ("its repeat", request(join(&base, &prompt(60, 7)), 6, greedy.clone()), 144),
        ("unrelated", request(prompt(40, 3), 6, greedy.clone()), 0),
    ];
    for (what, req, want_cached) in &cases {
        let o = collect(s.scheduler.submit(req.clone()).unwrap()).await;
        assert_same(&model, req, &o, &format!("{mixer}: {what}"));
        assert_eq!(cached(&o), *want_cached, "{mixer}: {what}: cached prompt tokens");
    }
    // Prompt log-probabilities need every position's logits: never resumed, and the same.
    let mut req = request(base.clone(), 3, SamplingParams::default());
    req.prompt_logprobs = true;
    let mut rx = s.scheduler.submit(req.clone()).unwrap();
    let mut plps = Vec::new();
    let mut o = Outcome::default();
    while let Some(item) = rx.recv().await {
        match item {
            Event::PromptLogprobs(p) => plps.extend(p.iter().map(|p| p.logprob)),
            Event::Tokens(c) => {
                o.tokens.extend(c.tokens.iter().map(|t| t.token));
                o.logprobs.extend(c.tokens.iter().map(|t| t.logprob));
            }
            Event::Finished(f) => o.finished = Some(f),
            Event::Progress(_) => {}
        }
    }
    assert_same(&model, &req, &o, "prompt logprobs");
    assert_eq!(cached(&o), 0);
    let want: Vec<f32> = alone_generation(&model, &req).prompt_logprobs.unwrap().into_iter().flatten().collect();
    assert_eq!(plps.len(), want.len());
    assert!(plps.iter().zip(&want).all(|(a, b)| (a - b).abs() <= TOL));

    // The cache on is the cache off, request for request.
    let off = start_model(model.clone(), config(false), 1000, None);
    for (what, req, _) in &cases {
        let o = collect(off.scheduler.submit(req.clone()).unwrap()).await;
        assert_eq!(cached(&o), 0, "{what}: the cache is off");
        assert_same(&model, req, &o, &format!("{mixer}, cache off: {what}"));
    }
    assert_eq!(off.exec.lock().unwrap().engine().snapshot_usage().0, 0, "the cache off takes no snapshots");

    // Flushed, the workers hold nothing and the next repeat prefills from the start.
    wait_until(|| sequences(&s) == 0).await;
    let (dropped, in_use) = s.scheduler.flush_prefix_cache().await.unwrap();
    assert!(dropped > 0 && in_use == 0, "{dropped} {in_use}");
    wait_until(|| s.exec.lock().unwrap().engine().snapshot_usage().0 == 0).await;
    assert_eq!(s.exec.lock().unwrap().engine().pool().used_blocks(), 0);
    let o = collect(s.scheduler.submit(cases[0].1.clone()).unwrap()).await;
    assert_eq!(cached(&o), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_requests_match_fresh_ones_gated_retention() {
    cached_requests_match_fresh_ones("gret").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_requests_match_fresh_ones_sliding_window() {
    cached_requests_match_fresh_ones("swa").await;
}

/// 30 blocks of 16 tokens hold three requests at a time but not the snapshots of all: old ones
/// are evicted while requests run, every request gets its own answer, none is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_budget_evicts_and_every_answer_stays_right() {
    let model = fixture("gret");
    let s = start_model(model.clone(), config(true), 30, None);
    let families: Vec<Vec<u32>> = (0..4).map(|f| prompt(90, 20 + f)).collect();
    let reqs: Vec<GenRequest> = (0..16)
        .map(|i| {
            let tail = prompt(5 + (i * 7) % 40, 40 + i);
            request(join(&families[i % 4], &tail), 8, SamplingParams::default())
        })
        .collect();
    let mut outcomes = Vec::new();
    // Two waves: the second finds some of the first's snapshots, and evicts others.
    for wave in reqs.chunks(8) {
        let streams: Vec<_> = wave.iter().map(|r| s.scheduler.submit(r.clone()).unwrap()).collect();
        outcomes.extend(futures_all(streams.into_iter().map(collect)).await);
    }
    for (i, (r, o)) in reqs.iter().zip(&outcomes).enumerate() {
        assert_same(&model, r, o, &format!("request {i}"));
    }
    assert!(outcomes.iter().any(|o| cached(o) > 0), "some request found a cached prefix");
    let exec = s.exec.clone();
    wait_until(|| sequences(&s) == 0).await;
    let stats = s.scheduler.prefix_stats().unwrap();
    assert!(stats.blocks <= 30, "{stats:?}");
    // Made: at 32, 64 and 80 or more for each request; held: what 30 blocks allow.
    let held = exec.lock().unwrap().engine().snapshot_usage().0;
    assert!(held < 16 * 3, "snapshots were evicted: {held} held");
    assert!(exec.lock().unwrap().engine().pool().used_blocks() <= 30);
    s.scheduler.flush_prefix_cache().await.unwrap();
    wait_until(|| exec.lock().unwrap().engine().pool().used_blocks() == 0).await;
}

fn disk_config(budget_bytes: u64) -> SchedulerConfig {
    let mut c = config(true);
    c.prefix.disk = Some(DiskConfig { budget_bytes, block_bytes: 0, state_bytes: 0 });
    c
}

fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in walk(dir) {
        if e.extension().is_some_and(|x| x == "snap") {
            out.push(e);
        }
    }
    out
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A document whose snapshots memory cannot keep beside other work: they go to disk when
/// evicted, come back on the next question instead of a prefill — with the answers of an
/// uncached run —, survive a restart, and a corrupted file is a miss, not a wrong answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_snapshots_come_back_from_disk() {
    let model = fixture("gret");
    let dir = tempfile::tempdir().unwrap();
    // 30 blocks of 16 tokens: one 200-token document with its question at a time.
    let s = start_with_disk(model.clone(), disk_config(1 << 30), 30, None, Some(dir.path()));
    let doc = prompt(200, 1);
    let ask = |q: usize| request(join(&doc, &prompt(10 + q, 50 + q)), 6, SamplingParams::default());
    // (`prompt`'s salts repeat every 90.)
    let other = |k: usize| request(prompt(300, 30 + k), 4, SamplingParams::default());
    let o = collect(s.scheduler.submit(ask(0)).unwrap()).await;
    assert_same(&model, &ask(0), &o, "first question");
    assert_eq!(cached(&o), 0);
    // Two unrelated long prompts evict the document's snapshots from memory: to disk.
    for k in 0..2 {
        let o = collect(s.scheduler.submit(other(k)).unwrap()).await;
        assert_same(&model, &other(k), &o, "unrelated");
    }
    let stats = s.scheduler.prefix_stats().unwrap();
    assert!(stats.disk_snapshots >= 6, "the document's chain is on disk: {stats:?}");
    assert!(!files(dir.path()).is_empty());
    // The next question reads the document back: the prompt up to its last snapshot at 192
    // is not prefilled again.
    let reads = crate::metrics::METRICS.prefix_disk_reads.get();
    let o = collect(s.scheduler.submit(ask(1)).unwrap()).await;
    assert_same(&model, &ask(1), &o, "second question, from disk");
    assert_eq!(cached(&o), 192);
    assert!(crate::metrics::METRICS.prefix_disk_reads.get() > reads);
    // The budget holds: memory never overcommitted.
    wait_until(|| sequences(&s) == 0).await;
    assert!(s.exec.lock().unwrap().engine().pool().used_blocks() <= 30);
    s.scheduler.drain(std::time::Duration::from_secs(5));
    s.task.await.unwrap();

    // A restart (a new engine and scheduler on the same directory) finds the tier again.
    let s = start_with_disk(model.clone(), disk_config(1 << 30), 30, None, Some(dir.path()));
    let o = collect(s.scheduler.submit(ask(2)).unwrap()).await;
    assert_same(&model, &ask(2), &o, "after a restart");
    assert_eq!(cached(&o), 192, "found on disk after a restart");
    s.scheduler.drain(std::time::Duration::from_secs(5));
    s.task.await.unwrap();

    // Every file corrupted: the next run's question is a plain miss, answered right, and the
    // bad files are gone.
    for f in files(dir.path()) {
        let mut b = std::fs::read(&f).unwrap();
        let n = b.len();
        b[n - 40] ^= 0xff;
        std::fs::write(&f, b).unwrap();
    }
    let s = start_with_disk(model.clone(), disk_config(1 << 30), 30, None, Some(dir.path()));
    let o = collect(s.scheduler.submit(ask(3)).unwrap()).await;
    assert_same(&model, &ask(3), &o, "corrupted tier");
    assert_eq!(cached(&o), 0, "a corrupted file is a miss");
    wait_until(|| sequences(&s) == 0).await;
    // The chain's files were read and failed; those not read are still listed, and would
    // fail when read.
    assert!(crate::metrics::METRICS.prefix_disk_failures.with_label_values(&["read"]).get() > 0);
}

/// A disk budget below one document's chain keeps what fits, least recently used out first,
/// and never breaks a chain: every hit it gives is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_disk_budget_keeps_answers_right() {
    let model = fixture("gret");
    let dir = tempfile::tempdir().unwrap();
    let kv = model.cfg.kv_dim();
    // Room for about three snapshots' files of two blocks each.
    let block = (2 * 16 * kv * 4) as u64;
    let budget = 3 * (2 * block + (model.cfg.self_state_numbers() * 4) as u64 + (64 << 10));
    let s = start_with_disk(model.clone(), disk_config(budget), 30, None, Some(dir.path()));
    let docs: Vec<Vec<u32>> = (0..3).map(|d| prompt(200, 10 + d)).collect();
    for round in 0..2 {
        for (d, doc) in docs.iter().enumerate() {
            let req = request(join(doc, &prompt(12, 60 + d + round)), 4, SamplingParams::default());
            let o = collect(s.scheduler.submit(req.clone()).unwrap()).await;
            assert_same(&model, &req, &o, &format!("round {round}, document {d}"));
        }
        let stats = s.scheduler.prefix_stats().unwrap();
        assert!(stats.disk_bytes <= budget, "{stats:?} over {budget}");
    }
    let on_disk: u64 = files(dir.path()).iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
    assert!(on_disk <= budget, "{on_disk} bytes of files over {budget}");
}

/// A drained scheduler writes the snapshots it holds to the disk tier, so that the next one on
/// the same directory starts with them; with no memory for snapshots (`memory_blocks` 0) every
/// hit is read back from disk, and is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_server_leaves_its_prefixes_on_disk_and_disk_only_hits_are_right() {
    let model = fixture("swa");
    let dir = tempfile::tempdir().unwrap();
    let doc = prompt(150, 3);
    let ask = |q: usize| request(join(&doc, &prompt(9, 60 + q)), 5, SamplingParams::default());
    let s = start_with_disk(model.clone(), disk_config(1 << 30), 1000, None, Some(dir.path()));
    let o = collect(s.scheduler.submit(ask(0)).unwrap()).await;
    assert_same(&model, &ask(0), &o, "first");
    assert_eq!(s.scheduler.prefix_stats().unwrap().disk_snapshots, 0, "memory had room: nothing written yet");
    s.scheduler.drain(std::time::Duration::from_secs(5));
    s.task.await.unwrap();
    assert!(!files(dir.path()).is_empty(), "written at the drain");

    let mut c = disk_config(1 << 30);
    c.prefix.memory_blocks = Some(0);
    let s = start_with_disk(model.clone(), c, 1000, None, Some(dir.path()));
    for q in 1..4 {
        let reads = crate::metrics::METRICS.prefix_disk_reads.get();
        let o = collect(s.scheduler.submit(ask(q)).unwrap()).await;
        assert_same(&model, &ask(q), &o, &format!("question {q}, from disk"));
        assert_eq!(cached(&o), 144);
        assert!(crate::metrics::METRICS.prefix_disk_reads.get() > reads, "read back from disk");
        wait_until(|| sequences(&s) == 0).await;
        let exec = s.exec.clone();
        wait_until(|| exec.lock().unwrap().engine().snapshot_usage().0 == 0).await;
        assert_eq!(s.exec.lock().unwrap().engine().pool().used_blocks(), 0, "no memory kept once it ends");
    }
}
