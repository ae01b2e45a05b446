//! Cache-aware routing over two worker groups (etcd membership, real processes): a long document
//! asked questions in any order is prefilled once — every question after the first goes to the
//! group that caches the document and resumes from it — while short unrelated requests still
//! spread over both groups.

use std::time::{Duration, Instant};

use yoco_e2e::cluster::{groups, wait_groups, Worker};
use yoco_e2e::etcd::Etcd;
use yoco_e2e::http::{http_get, parse_prometheus};
use yoco_e2e::server::{generate, ids_prompt, Server};
use yoco_proto::v1 as pb;

const VOCAB: usize = 2000;
/// The document: 64K tokens and a little, past eight snapshot intervals (8192 tokens).
const DOC: usize = 65_600;

fn request(ids: Vec<u32>, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: ids_prompt(&ids),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_about_one_document_go_to_the_group_that_caches_it() {
    let home = tempfile::tempdir().unwrap();
    let model = yoco_e2e::init_tiny_model(home.path(), VOCAB);
    let etcd = Etcd::start(home.path());
    let _workers: Vec<Worker> =
        ["g0", "g1"].iter().map(|g| Worker::start(home.path(), &model, &etcd, g, 0, 1)).collect();
    let args = ["coordinator", "--etcd", &etcd.endpoint, "--cluster", "t", "--lease-ttl", "2"];
    let server = Server::start(home.path(), &args).await;
    let mut client = server.client().await;
    wait_groups(&mut client, &["g0", "g1"], Duration::from_secs(60)).await;

    let doc = yoco_e2e::prompt_ids(DOC, 1, VOCAB);
    // Ten questions, asked in a shuffled order (a fixed one, so that runs compare).
    let order = [7, 2, 9, 0, 5, 3, 8, 1, 6, 4];
    let mut ttfts = Vec::new();
    for &q in &order {
        let mut ids = doc.clone();
        ids.extend(yoco_e2e::prompt_ids(32, 100 + q, VOCAB));
        let started = Instant::now();
        let o = generate(&mut client, request(ids, 2)).await.unwrap();
        assert_eq!(o.reason(), pb::FinishReason::Length, "question {q}: {:?}", o.status);
        ttfts.push(o.first_token.unwrap().duration_since(started).as_secs_f64());
        let cached = o.finished.unwrap().usage.unwrap().cached_prompt_tokens as usize;
        if ttfts.len() == 1 {
            assert_eq!(cached, 0, "the first question prefills the document");
        } else {
            assert!(cached >= 65_536, "question {q} (number {} asked) resumed from {cached} tokens", ttfts.len());
        }
    }
    eprintln!("time to first token, s, in the order asked: {ttfts:.3?}");
    // A hit resumes after the document: far quicker than the prefill of the first.
    let slowest_hit = ttfts[1..].iter().copied().fold(0.0, f64::max);
    assert!(slowest_hit < ttfts[0] / 2.0, "time to first token: {ttfts:?}");

    // Unrelated short prompts, none cached anywhere, still spread over both groups.
    let before: Vec<u64> = groups(&mut client).await.iter().map(|g| g.routed).collect();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move { generate(&mut c, request(yoco_e2e::prompt_ids(40, 500 + i, VOCAB), 64)).await })
        })
        .collect();
    for h in handles {
        assert_eq!(h.await.unwrap().unwrap().reason(), pb::FinishReason::Length);
    }
    let after: Vec<u64> = groups(&mut client).await.iter().map(|g| g.routed).collect();
    let spread: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert!(spread.iter().all(|&n| n >= 2), "short requests per group: {spread:?}");

    // The router says why: nine questions to the group with the document's prefix.
    let m = parse_prometheus(&http_get(&server.http, "/metrics").1);
    assert_eq!(m["yoco_router_requests_total{decision=\"prefix\"}"], 9.0);
    assert!(m["yoco_router_cached_prefix_tokens_total{decision=\"prefix\"}"] >= 9.0 * 65_536.0);
}
