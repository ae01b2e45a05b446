//! The prefix cache end to end: `yoco serve` with 1 and 2 real worker processes (context or
//! tensor parallel), the cache on and off. Requests over one long document give the same tokens
//! and log-probabilities (within 1e-4) either way, alone or concurrent, and the same as one
//! rank's; they report the prompt tokens the cache served (gRPC `usage`, OpenAI `cached_tokens`,
//! metrics); a flush drops every snapshot on every rank.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use yoco_e2e::http::{http_get, http_post, parse_prometheus};
use yoco_e2e::server::{assert_same, cached, generate, ids_prompt, Outcome, Server};
use yoco_proto::v1 as pb;

const VOCAB: usize = 2000;
/// Of the workers' cache blocks (`group::BLOCK_TOKENS`).
const BLOCK: u64 = 256;

fn init_model(home: &Path) -> PathBuf {
    yoco_e2e::init_tiny_model(home, VOCAB)
}

fn prompt(n: usize, salt: usize) -> Vec<u32> {
    yoco_e2e::prompt_ids(n, salt, VOCAB)
}

fn join(a: &[u32], b: &[u32]) -> Vec<u32> {
    a.iter().chain(b).copied().collect()
}

fn request(ids: &[u32], sampling: pb::SamplingParams) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: ids_prompt(ids),
        max_tokens: Some(6),
        sampling: Some(sampling),
        ignore_eos: true,
        ..Default::default()
    }
}

async fn serve(home: &Path, model: &Path, workers: usize, extra: &[&str]) -> Server {
    let workers = workers.to_string();
    let mut args = vec!["serve", "--model", model.to_str().unwrap(), "--workers", &workers];
    args.extend_from_slice(extra);
    Server::start(home, &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_prompts_give_what_uncached_ones_give_on_one_and_two_ranks() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path());
    let doc = prompt(1500, 1);
    let (q1, q2, q3) = (prompt(20, 2), prompt(20, 3), prompt(20, 4));
    let seeded = pb::SamplingParams { temperature: 0.9, top_p: Some(0.95), seed: Some(3), ..Default::default() };
    // Snapshots every 512 tokens and at a prompt's last block boundary before its last token.
    let cases: Vec<(&str, pb::GenerateRequest, u64)> = vec![
        ("first", request(&join(&doc, &q1), Default::default()), 0),
        ("exact repeat", request(&join(&doc, &q1), Default::default()), 5 * BLOCK),
        ("another question", request(&join(&doc, &q2), Default::default()), 5 * BLOCK),
        ("seeded", request(&join(&doc, &q2), seeded), 5 * BLOCK),
        ("match inside a block", request(&join(&doc[..700], &q3), Default::default()), 2 * BLOCK),
        ("match past the last snapshot", request(&join(&doc[..1100], &q3), Default::default()), 4 * BLOCK),
        // Prompt log-probabilities need every prompt position's logits: never served from cache.
        (
            "prompt log-probabilities",
            pb::GenerateRequest { prompt_logprobs: true, ..request(&join(&doc[..600], &q1), Default::default()) },
            0,
        ),
    ];
    // One rank, two context-parallel ranks and two tensor-parallel ones, which must serve what
    // the one rank serves.
    let mut one_rank: Option<Vec<Outcome>> = None;
    for (workers, tp) in [(1, "1"), (2, "1"), (2, "2")] {
        let grid = ["--worker-device", "cpu", "--tp", tp];
        let on =
            serve(home.path(), &model, workers, &[&grid[..], &["--prefix-snapshot-interval", "512"]].concat()).await;
        let off = serve(home.path(), &model, workers, &[&grid[..], &["--no-prefix-cache"]].concat()).await;
        let workers = format!("{workers} (tp {tp})");
        let (mut con, mut coff) = (on.client().await, off.client().await);
        let mut fresh = Vec::new();
        for (what, req, want_cached) in &cases {
            let a = generate(&mut con, req.clone()).await.unwrap();
            let b = generate(&mut coff, req.clone()).await.unwrap();
            assert_same(&a, &b, &format!("P={workers}: {what}"));
            assert_eq!(cached(&a), *want_cached, "P={workers}: {what}: cached prompt tokens");
            assert_eq!(cached(&b), 0);
            fresh.push(b);
        }
        match &one_rank {
            None => one_rank = Some(fresh.clone()),
            Some(one) => {
                for ((a, b), (what, ..)) in fresh.iter().zip(one).zip(&cases) {
                    assert_same(a, b, &format!("P={workers} against one rank: {what}"));
                }
            }
        }
        let info = con.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
        assert!(info.prefix_cache && info.prefix_cache_snapshots > 0 && info.prefix_cache_blocks > 0, "{info:?}");
        assert!(info.ranks.iter().all(|r| r.device == "cpu"), "{info:?}");
        assert!(!coff.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner().prefix_cache);

        // All at once, from a flushed cache: they share what the first of them prefill.
        let f = con.flush_prefix_cache(pb::FlushPrefixCacheRequest {}).await.unwrap().into_inner();
        assert_eq!((f.dropped, f.in_use), (info.prefix_cache_snapshots, 0));
        let handles: Vec<_> = cases
            .iter()
            .map(|(_, r, _)| {
                let (mut c, r) = (con.clone(), r.clone());
                tokio::spawn(async move { generate(&mut c, r).await.unwrap() })
            })
            .collect();
        for ((h, b), (what, ..)) in handles.into_iter().zip(&fresh).zip(&cases) {
            assert_same(&h.await.unwrap(), b, &format!("P={workers}, concurrent: {what}"));
        }

        // OpenAI's usage says what was cached; the metrics count it.
        let body = serde_json::json!({"prompt": join(&doc, &q1), "max_tokens": 2}).to_string();
        let (code, text) = http_post(&on.http, "/v1/completions", &body);
        assert_eq!(code, 200, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 5 * BLOCK, "{v}");
        let m = parse_prometheus(&http_get(&on.http, "/metrics").1);
        assert!(m["yoco_prefix_cache_hits_total"] >= (5 * BLOCK) as f64);
        assert!(m["yoco_prefix_cache_queries_total"] > m["yoco_prefix_cache_hits_total"]);

        // Flushed, no rank holds anything once the last sequence is freed.
        let (code, text) = http_post(&on.http, "/reset_prefix_cache", "");
        assert_eq!(code, 200, "{text}");
        let started = Instant::now();
        loop {
            let info = con.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
            let workers_empty = info.ranks.iter().all(|r| r.cache_used_bytes == 0 && r.sequences == 0);
            if workers_empty && (info.prefix_cache_snapshots, info.prefix_cache_blocks) == (0, 0) {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "not freed: {info:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let again = generate(&mut con, cases[0].1.clone()).await.unwrap();
        assert_eq!(cached(&again), 0, "nothing is found after a flush");
        assert_same(&again, &fresh[0], "after the flush");
    }
}
