//! The prefix cache's disk tier end to end: `yoco serve` with two real worker processes
//! (context-parallel, each writing its own shard's files) and a memory budget too small to keep
//! a document beside other work, then none for snapshots at all (`--prefix-memory-mib 0`). The document's snapshots go to disk when evicted and come back
//! on the next question instead of a prefill, with the tokens and log-probabilities (1e-4) of an
//! uncached server; a restarted server finds them again; a corrupted file is a miss that is
//! removed, never a wrong answer.

use std::path::{Path, PathBuf};

use yoco_e2e::http::{http_get, parse_prometheus};
use yoco_e2e::server::{assert_same, cached, generate, ids_prompt, Server};
use yoco_proto::v1 as pb;
use yoco_proto::v1::generation_client::GenerationClient;

const VOCAB: usize = 2000;

fn prompt(n: usize, salt: usize) -> Vec<u32> {
    yoco_e2e::prompt_ids(n, salt, VOCAB)
}

fn request(ids: Vec<u32>) -> pb::GenerateRequest {
    pb::GenerateRequest { prompt: ids_prompt(&ids), max_tokens: Some(6), ignore_eos: true, ..Default::default() }
}

/// The snapshot files under `dir`, every rank's.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "snap") {
                out.push(p);
            }
        }
    }
    out
}

async fn serve(home: &Path, model: &Path, extra: &[&str]) -> Server {
    // 4 MiB of cache per rank: 32 blocks of 256 tokens. A document's chain of snapshots takes
    // 18 of them (each snapshot's retention states are 2 blocks), so two more documents evict it.
    let mut args = vec!["serve", "--model", model.to_str().unwrap(), "--workers", "2", "--worker-device", "cpu"];
    args.extend_from_slice(&["--cache-mib", "4", "--prefix-snapshot-interval", "512"]);
    args.extend_from_slice(extra);
    Server::start(home, &args).await
}

async fn disk_snapshots(client: &mut GenerationClient<tonic::transport::Channel>) -> u32 {
    client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner().prefix_disk_snapshots
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_documents_come_back_from_disk_and_survive_a_restart() {
    let home = tempfile::tempdir().unwrap();
    let model = yoco_e2e::init_tiny_model(home.path(), VOCAB);
    let tier = home.path().join("tier");
    let tier_arg = tier.to_str().unwrap();
    let doc = prompt(3000, 1);
    let ask = |q: usize| request([doc.clone(), prompt(20, 10 + q)].concat());
    let other = |k: usize| request(prompt(3000, 50 + k));
    let plain = serve(home.path(), &model, &["--no-prefix-cache"]).await;
    let mut reference = plain.client().await;
    let mut want = Vec::new();
    for q in 0..5 {
        want.push(generate(&mut reference, ask(q)).await.unwrap());
    }
    drop(reference);
    drop(plain);

    let server = serve(home.path(), &model, &["--prefix-disk-dir", tier_arg]).await;
    let mut client = server.client().await;
    let o = generate(&mut client, ask(0)).await.unwrap();
    assert_same(&o, &want[0], "first question");
    assert_eq!(cached(&o), 0);
    for k in 0..2 {
        let o = generate(&mut client, other(k)).await.unwrap();
        assert!(o.status.is_none(), "{:?}", o.status);
    }
    assert!(disk_snapshots(&mut client).await >= 5, "the document went to disk");
    assert!(!files(&tier).is_empty());
    let o = generate(&mut client, ask(1)).await.unwrap();
    assert_same(&o, &want[1], "second question, read back from disk");
    // Snapshots every 512 tokens and at a prompt's last block boundary before its end: 2816,
    // inside the document.
    assert_eq!(cached(&o), 2816);
    let m = parse_prometheus(&http_get(&server.http, "/metrics").1);
    assert_eq!(m["yoco_prefix_disk_hits_total"], 2816.0, "counted as a hit from disk");
    assert!(m["yoco_prefix_disk_writes_total"] >= 5.0 && m["yoco_prefix_disk_bytes"] > 0.0);
    // Both ranks wrote their own shard's files.
    let ranks: std::collections::BTreeSet<String> =
        files(&tier).iter().map(|f| f.parent().unwrap().file_name().unwrap().to_string_lossy().into()).collect();
    assert_eq!(ranks.into_iter().collect::<Vec<_>>(), ["rank0", "rank1"]);
    drop(client);
    server.terminate();
    drop(server);

    // A restarted server finds the tier: a hit, no prefill of the document.
    let server = serve(home.path(), &model, &["--prefix-disk-dir", tier_arg]).await;
    let mut client = server.client().await;
    assert!(disk_snapshots(&mut client).await >= 5, "found after the restart");
    let o = generate(&mut client, ask(2)).await.unwrap();
    assert_same(&o, &want[2], "after a restart");
    assert_eq!(cached(&o), 2816);
    drop(client);
    drop(server);

    // The deepest files (at 2816: the document's, and the other prompts'), changed on one
    // rank: that link is a miss and is removed; the request resumes from the one before it.
    let pos = |f: &PathBuf| {
        let b = std::fs::read(f).unwrap();
        // The header, after the magic, the version and its length.
        let len = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&b[16..16 + len]).unwrap();
        header["pos"].as_u64().unwrap()
    };
    let rank1 = files(&tier).into_iter().filter(|f| f.parent().unwrap().ends_with("rank1"));
    let deepest: Vec<PathBuf> = rank1.filter(|f| pos(f) == 2816).collect();
    assert!(!deepest.is_empty(), "the document's last snapshot is on disk");
    for f in &deepest {
        let mut bytes = std::fs::read(f).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0x55;
        std::fs::write(f, bytes).unwrap();
    }
    let server = serve(home.path(), &model, &["--prefix-disk-dir", tier_arg]).await;
    let mut client = server.client().await;
    let o = generate(&mut client, ask(3)).await.unwrap();
    assert_same(&o, &want[3], "a corrupted link");
    assert_eq!(cached(&o), 2560, "the corrupted snapshot is not used");
    assert!(deepest.iter().any(|f| !f.exists()), "and its file is gone");
    let m = parse_prometheus(&http_get(&server.http, "/metrics").1);
    assert!(m["yoco_prefix_disk_failures_total{op=\"read\"}"] >= 1.0);
    // The admin flush clears the tier too.
    client.flush_prefix_cache(pb::FlushPrefixCacheRequest {}).await.unwrap();
    let o = generate(&mut client, ask(4)).await.unwrap();
    assert_same(&o, &want[4], "after a flush");
    assert_eq!(cached(&o), 0);
    assert!(files(&tier).is_empty(), "{:?}", files(&tier));

    drop(client);
    drop(server);

    // No memory for snapshots (`--prefix-memory-mib 0`): the first question's snapshots go to
    // disk as soon as it ends, and every later question is read back from there.
    let server = serve(home.path(), &model, &["--prefix-disk-dir", tier_arg, "--prefix-memory-mib", "0"]).await;
    let mut client = server.client().await;
    for (q, want) in want.iter().enumerate().take(3) {
        let o = generate(&mut client, ask(q)).await.unwrap();
        assert_same(&o, want, &format!("question {q}, disk only"));
        assert_eq!(cached(&o), if q == 0 { 0 } else { 2816 }, "question {q}, disk only");
        // Once it ends, memory keeps no snapshot.
        let started = std::time::Instant::now();
        loop {
            let info = client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
            if info.prefix_cache_snapshots == 0 && info.prefix_disk_snapshots > 0 {
                break;
            }
            assert!(started.elapsed().as_secs() < 10, "snapshots kept in memory: {info:?}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let m = parse_prometheus(&http_get(&server.http, "/metrics").1);
    assert_eq!(m["yoco_prefix_disk_hits_total"], 2.0 * 2816.0, "both later questions from disk");
}
