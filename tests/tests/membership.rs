//! Membership through a real etcd server: `yoco worker --etcd` processes register their ranks,
//! `yoco coordinator --etcd` forms the groups it finds and routes requests over them. A killed
//! rank takes only its group out of service, with UNAVAILABLE naming the rank, in bounded time;
//! its restart re-forms the group, and the surviving group holds no cache afterwards; an etcd
//! restart changes nothing for the clients; a second coordinator shares the groups and takes
//! over those of one that died; a restarted coordinator serves its groups again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use yoco_e2e::cluster::{groups, wait_groups, Worker};
use yoco_e2e::etcd::Etcd;
use yoco_e2e::server::{drain, generate, ids_prompt, Server};
use yoco_proto::v1 as pb;
use yoco_proto::v1::generation_client::GenerationClient;

const VOCAB: usize = 2000;
const TTL: &str = "2";

fn init_model(home: &Path) -> PathBuf {
    yoco_e2e::init_tiny_model(home, VOCAB)
}

async fn coordinator(home: &Path, etcd: &Etcd) -> Server {
    Server::start(home, &["coordinator", "--etcd", &etcd.endpoint, "--cluster", "t", "--lease-ttl", TTL]).await
}

fn request(salt: u32, max_tokens: u32) -> pb::GenerateRequest {
    let ids = yoco_e2e::prompt_ids(40, salt as usize, VOCAB);
    pb::GenerateRequest {
        prompt: ids_prompt(&ids),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..Default::default()
    }
}

/// Starts a long request and returns its stream once its first token came.
async fn started_stream(client: &mut GenerationClient<Channel>, salt: u32) -> tonic::Streaming<pb::GenerateResponse> {
    let mut s = client.generate(request(salt, 400)).await.unwrap().into_inner();
    loop {
        let msg = s.next().await.expect("stream ended before a token").unwrap();
        if matches!(msg.event, Some(pb::generate_response::Event::Tokens(_))) {
            return s;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_share_the_load_and_a_lost_rank_takes_out_only_its_group() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path());
    let etcd = Etcd::start(home.path());
    let mut workers: Vec<Worker> = ["g0", "g1"]
        .iter()
        .flat_map(|g| (0..2).map(move |r| (*g, r)))
        .map(|(g, r)| Worker::start(home.path(), &model, &etcd, g, r, 2))
        .collect();
    let server = coordinator(home.path(), &etcd).await;
    let mut client = server.client().await;
    wait_groups(&mut client, &["g0", "g1"], Duration::from_secs(60)).await;

    // Concurrent requests spread over both groups, and a request gives the same tokens on each.
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move { generate(&mut c, request(i % 2, 8)).await.unwrap() })
        })
        .collect();
    let mut outs = Vec::new();
    for h in handles {
        outs.push(h.await.unwrap());
    }
    for (i, o) in outs.iter().enumerate() {
        assert_eq!(o.reason(), pb::FinishReason::Length, "request {i}: {:?}", o.status);
        assert_eq!(o.tokens, outs[i % 2].tokens, "request {i}: the same prompt gave other tokens");
    }
    let routed: Vec<u64> = groups(&mut client).await.iter().map(|g| g.routed).collect();
    assert!(routed.iter().all(|&n| n >= 2) && routed.iter().sum::<u64>() == 8, "routed {routed:?}");

    // Two long requests on each group (the idler group takes each), then rank 1 of g1 is killed.
    let mut streams = Vec::new();
    for salt in 0..4 {
        streams.push(started_stream(&mut client, salt).await);
    }
    let killed = Instant::now();
    workers[3].kill9();
    let ends: Vec<_> =
        streams.into_iter().map(|s| tokio::spawn(async move { (drain(s).await, killed.elapsed()) })).collect();
    let (mut failed, mut finished) = (0, 0);
    for e in ends {
        let (o, after) = e.await.unwrap();
        match o.status {
            Some(s) => {
                eprintln!("a request on the lost group ended {after:?} after the kill: {}", s.message());
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                let m = s.message();
                assert!(m.contains("rank 1") && m.contains("g1"), "the error should name the lost rank: {m}");
                assert!(after < Duration::from_secs(2 + 5), "the failure took {after:?}");
                failed += 1;
            }
            None => {
                assert_eq!(o.reason(), pb::FinishReason::Length);
                finished += 1;
            }
        }
    }
    assert_eq!((failed, finished), (2, 2), "g1's requests fail, g0's finish");
    // Nothing leaks on the surviving group: its ranks hold no sequence and no cache.
    let started = Instant::now();
    loop {
        let info = client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
        if info.groups.len() == 1 && info.ranks.iter().all(|r| r.cache_used_bytes == 0 && r.sequences == 0) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "g0 still holds: {:?}", info.ranks);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The coordinator stays up and serves with g0 alone.
    wait_groups(&mut client, &["g0"], Duration::from_secs(10)).await;
    assert_eq!(server.health().await, Some(ServingStatus::Serving));
    assert_eq!(generate(&mut client, request(5, 4)).await.unwrap().reason(), pb::FinishReason::Length);

    // The rank comes back: g1 forms again and takes requests.
    workers[3] = Worker::start(home.path(), &model, &etcd, "g1", 1, 2);
    wait_groups(&mut client, &["g0", "g1"], Duration::from_secs(60)).await;
    for salt in 0..2 {
        assert_eq!(generate(&mut client, request(salt, 4)).await.unwrap().reason(), pb::FinishReason::Length);
    }
    let g = groups(&mut client).await;
    assert!(g.iter().all(|g| g.routed >= 1), "both groups served after the re-form: {g:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_continues_through_an_etcd_restart_and_membership_resumes() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path());
    let mut etcd = Etcd::start(home.path());
    let mut g0: Vec<Worker> = (0..2).map(|r| Worker::start(home.path(), &model, &etcd, "g0", r, 2)).collect();
    let server = coordinator(home.path(), &etcd).await;
    let mut client = server.client().await;
    wait_groups(&mut client, &["g0"], Duration::from_secs(60)).await;

    // etcd goes down: requests are still served.
    etcd.kill();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(3) {
        let o = generate(&mut client, request(1, 4)).await.unwrap();
        assert_eq!(o.reason(), pb::FinishReason::Length, "{:?}", o.status);
    }
    etcd.restart();
    // Membership resumes: a new group is found and formed, and a lost rank is noticed again.
    let _g1 = Worker::start(home.path(), &model, &etcd, "g1", 0, 1);
    wait_groups(&mut client, &["g0", "g1"], Duration::from_secs(60)).await;
    g0[0].kill9();
    wait_groups(&mut client, &["g1"], Duration::from_secs(2 + 10)).await;
    assert_eq!(generate(&mut client, request(2, 4)).await.unwrap().reason(), pb::FinishReason::Length);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_share_the_groups_and_take_over_a_dead_ones() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path());
    let etcd = Etcd::start(home.path());
    let args = ["coordinator", "--etcd", &etcd.endpoint, "--cluster", "t", "--lease-ttl", TTL];
    let (a, b) = (Server::spawn(home.path(), &args), Server::spawn(home.path(), &args));
    let _workers: Vec<Worker> =
        ["g0", "g1"].iter().map(|g| Worker::start(home.path(), &model, &etcd, g, 0, 1)).collect();
    a.wait_serving(Duration::from_secs(60)).await;
    b.wait_serving(Duration::from_secs(60)).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    // Each ends up with one group: one that drives a group waits before claiming another.
    let started = Instant::now();
    loop {
        let (ga, gb) = (groups(&mut ca).await, groups(&mut cb).await);
        if ga.len() == 1 && gb.len() == 1 && ga[0].name != gb[0].name {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "a: {ga:?}, b: {gb:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(generate(&mut ca, request(1, 4)).await.unwrap().reason(), pb::FinishReason::Length);
    assert_eq!(generate(&mut cb, request(1, 4)).await.unwrap().reason(), pb::FinishReason::Length);
    // A dies without a word; once its lease expires, B drives both groups.
    drop(a);
    wait_groups(&mut cb, &["g0", "g1"], Duration::from_secs(2 + 15)).await;
    assert_eq!(generate(&mut cb, request(2, 4)).await.unwrap().reason(), pb::FinishReason::Length);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_finds_its_groups_again() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path());
    let etcd = Etcd::start(home.path());
    let _g0 = Worker::start(home.path(), &model, &etcd, "g0", 0, 1);
    let first = coordinator(home.path(), &etcd).await;
    let mut client = first.client().await;
    assert_eq!(generate(&mut client, request(1, 4)).await.unwrap().reason(), pb::FinishReason::Length);
    // Killed mid-stream: the stream breaks off with an error and new calls get UNAVAILABLE, so
    // the client can retry elsewhere.
    let stream = started_stream(&mut client, 2).await;
    drop(first);
    let o = drain(stream).await;
    assert!(o.status.is_some() && o.finished.is_none(), "the stream should break off: {o:?}");
    // (A call sent before the client's channel saw its connection close ends CANCELLED,
    // "connection closed"; the one after it must be refused as UNAVAILABLE.)
    let mut e = client.model_info(pb::ModelInfoRequest {}).await.unwrap_err();
    if e.code() == tonic::Code::Cancelled {
        e = client.model_info(pb::ModelInfoRequest {}).await.unwrap_err();
    }
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    // A new coordinator takes the group over once the dead one's lease is gone; the worker
    // keeps its registration and the cache it held for the lost request is freed by the re-form.
    let second = coordinator(home.path(), &etcd).await;
    let mut client = second.client().await;
    wait_groups(&mut client, &["g0"], Duration::from_secs(30)).await;
    let o = generate(&mut client, request(1, 4)).await.unwrap();
    assert_eq!(o.reason(), pb::FinishReason::Length);
    // The request's last token reaches the client before the scheduler's next step frees its
    // sequence: nothing may be held once that step has run.
    let started = Instant::now();
    loop {
        let info = client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
        if info.ranks.iter().all(|r| r.cache_used_bytes == 0 && r.sequences == 0) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "still held: {:?}", info.ranks);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
