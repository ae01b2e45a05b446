//! Faults while a group forms: a rank that fails or dies during LoadModel fails the formation at
//! once (not at the other ranks' collective timeout), the other ranks give up their half-formed
//! group, and the group serves as soon as the rank is back. Afterwards no rank holds cache.

use std::path::Path;
use std::time::{Duration, Instant};

use yoco_e2e::cluster::{wait_groups, Worker};
use yoco_e2e::etcd::Etcd;
use yoco_e2e::server::{generate, ids_prompt, Server};
use yoco_proto::v1 as pb;
use yoco_proto::worker::v1 as wpb;
use yoco_proto::worker::v1::worker_client::WorkerClient;

const VOCAB: usize = 2000;

fn request(salt: usize) -> pb::GenerateRequest {
    let ids = yoco_e2e::prompt_ids(300, salt, VOCAB);
    pb::GenerateRequest { prompt: ids_prompt(&ids), max_tokens: Some(8), ignore_eos: true, ..Default::default() }
}

async fn worker_info(addr: &str) -> wpb::InfoResponse {
    let mut c = WorkerClient::connect(format!("http://{addr}")).await.unwrap();
    c.info(wpb::InfoRequest {}).await.unwrap().into_inner()
}

/// Waits until every worker at `addrs` holds no cache, sequence or snapshot (after a prefix-cache
/// flush, which reaches the ranks with the scheduler's next step, at once).
async fn wait_no_cache<'a>(addrs: impl IntoIterator<Item = &'a String>) {
    let flushed = Instant::now();
    for addr in addrs {
        loop {
            let info = worker_info(addr).await;
            if (info.cache_used_bytes, info.sequences, info.snapshots) == (0, 0, 0) {
                break;
            }
            assert!(flushed.elapsed() < Duration::from_secs(10), "{addr} still holds cache: {info:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until `log` (a file being written) contains `needle`.
async fn wait_log(log: impl Fn() -> String, needle: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    while !log().contains(needle) {
        assert!(started.elapsed() < limit, "no {needle:?} within {limit:?}:\n{}", log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_lost_while_the_group_forms_fails_it_at_once_and_it_forms_when_back() {
    let home = tempfile::tempdir().unwrap();
    let model = yoco_e2e::init_tiny_model(home.path(), VOCAB);
    let etcd = Etcd::start(home.path());
    // Rank 1 cannot load its model: every LoadModel fails on it, while rank 0 loads and waits for
    // rank 1 at the collective (for the default collective timeout of 120 s, were it not told).
    let missing = home.path().join("no-such-model");
    let w0 = Worker::start(home.path(), &model, &etcd, "g0", 0, 2);
    let mut w1 = Worker::start(home.path(), Path::new(&missing), &etcd, "g0", 1, 2);
    let server =
        Server::spawn(home.path(), &["coordinator", "--etcd", &etcd.endpoint, "--cluster", "t", "--lease-ttl", "2"]);
    let took = wait_log(|| server.stderr(), "worker group did not form; retrying", Duration::from_secs(30)).await;
    assert!(server.stderr().contains("rank 1"), "{}", server.stderr());
    // Every retry is cancelled on rank 0 too (the coordinator dropped its call), not left to
    // block the socket the next attempt forms on.
    wait_log(|| w0.stderr(), "load cancelled", Duration::from_secs(10)).await;
    eprintln!("formation failed after {took:?}");

    // Rank 1 dies and comes back with the model: the group forms, in a few seconds.
    w1.kill9();
    let back = Instant::now();
    let _w1 = Worker::start(home.path(), &model, &etcd, "g0", 1, 2);
    let mut client = server.client().await;
    wait_groups(&mut client, &["g0"], Duration::from_secs(20)).await;
    eprintln!("group serving {:?} after the rank came back", back.elapsed());
    let o = generate(&mut client, request(1)).await.unwrap();
    assert_eq!(o.reason(), pb::FinishReason::Length, "{:?}", o.status);

    // No rank holds any cache once its requests ended and the prefix cache is flushed.
    let _ = client.flush_prefix_cache(pb::FlushPrefixCacheRequest {}).await.unwrap();
    wait_no_cache([&w0.grpc, &_w1.grpc]).await;
}

/// Sends `signal` to `pid` with the shell's builtin kill (no procps needed).
fn signal(pid: u32, signal: &str) {
    std::process::Command::new("sh").args(["-c", &format!("kill -{signal} {pid}")]).status().unwrap();
}

/// A rank that stalls (SIGSTOP: alive, silent) while its group decodes: the request fails in
/// bounded time naming it, the group leaves service, and when the rank resumes (SIGCONT: its
/// lease lapsed meanwhile, so it registers again) the group re-forms and serves; afterwards no
/// rank holds cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_rank_takes_its_group_out_and_it_re_forms_when_the_rank_resumes() {
    let home = tempfile::tempdir().unwrap();
    let model = yoco_e2e::init_tiny_model(home.path(), VOCAB);
    let etcd = Etcd::start(home.path());
    let w: Vec<Worker> = (0..2).map(|r| Worker::start(home.path(), &model, &etcd, "g0", r, 2)).collect();
    let args =
        ["coordinator", "--etcd", &etcd.endpoint, "--cluster", "t", "--lease-ttl", "2", "--collective-timeout", "2"];
    let server = Server::start(home.path(), &args).await;
    let mut client = server.client().await;
    wait_groups(&mut client, &["g0"], Duration::from_secs(30)).await;

    let long = pb::GenerateRequest { max_tokens: Some(100_000), ..request(2) };
    let mut stream = client.generate(long).await.unwrap().into_inner();
    // Once it decodes, rank 1 stops.
    use tokio_stream::StreamExt;
    loop {
        let msg = stream.next().await.expect("stream ended early").unwrap();
        if matches!(msg.event, Some(pb::generate_response::Event::Tokens(_))) {
            break;
        }
    }
    signal(w[1].pid(), "STOP");
    let stopped = Instant::now();
    let outcome = yoco_e2e::server::drain(stream).await;
    let failed_after = stopped.elapsed();
    let status = outcome.status.expect("the request must fail");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("rank 1"), "{status:?}");
    // The collective timeout (2 s) on rank 0, then the coordinator's grace: well under 10 s.
    assert!(failed_after < Duration::from_secs(10), "failed after {failed_after:?}");

    // Resumed after its lease lapsed: it registers again and the group re-forms.
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(w[1].pid(), "CONT");
    let resumed = Instant::now();
    let started = Instant::now();
    loop {
        let last = match generate(&mut client, request(3)).await {
            Ok(o) if o.reason() == pb::FinishReason::Length => break,
            Ok(o) => format!("{:?}", o.status),
            Err(s) => format!("{s:?}"),
        };
        assert!(started.elapsed() < Duration::from_secs(30), "g0 did not serve again: {last}\n{}", server.stderr());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("failed {failed_after:?} after the stop; serving {:?} after the resume", resumed.elapsed());
    let _ = client.flush_prefix_cache(pb::FlushPrefixCacheRequest {}).await.unwrap();
    wait_no_cache(w.iter().map(|w| &w.grpc)).await;
}

/// A rank killed while a long prompt prefills (context-parallel over both ranks): the request
/// fails naming it, another request on the other group is untouched, and once the rank is back
/// its group serves again; afterwards no rank of either group holds cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_killed_mid_prefill_fails_only_its_requests() {
    use tokio_stream::StreamExt;
    let home = tempfile::tempdir().unwrap();
    let model = yoco_e2e::init_tiny_model(home.path(), VOCAB);
    let etcd = Etcd::start(home.path());
    let mut w: Vec<Worker> = ["g0", "g1"]
        .iter()
        .flat_map(|g| (0..2).map(move |r| (*g, r)))
        .map(|(g, r)| Worker::start(home.path(), &model, &etcd, g, r, 2))
        .collect();
    let args =
        ["coordinator", "--etcd", &etcd.endpoint, "--cluster", "t", "--lease-ttl", "2", "--prefill-chunk", "1024"];
    let server = Server::start(home.path(), &args).await;
    let mut client = server.client().await;
    wait_groups(&mut client, &["g0", "g1"], Duration::from_secs(30)).await;

    let long = |salt| {
        let ids = yoco_e2e::prompt_ids(80_000, salt, VOCAB);
        pb::GenerateRequest { prompt: ids_prompt(&ids), max_tokens: Some(4), ignore_eos: true, ..Default::default() }
    };
    // `a` prefills on one group (found from the ranks' Info), then `b` on the other (the router
    // takes the least-loaded group).
    let first_progress = |mut s: tonic::Streaming<pb::GenerateResponse>| async move {
        loop {
            let msg = s.next().await.expect("stream ended early").unwrap();
            if matches!(msg.event, Some(pb::generate_response::Event::Progress(_))) {
                return s;
            }
        }
    };
    let a = first_progress(client.clone().generate(long(10)).await.unwrap().into_inner()).await;
    let a_on_g0 = worker_info(&w[0].grpc).await.sequences > 0;
    let b = first_progress(client.clone().generate(long(11)).await.unwrap().into_inner()).await;
    let (victim, group) = if a_on_g0 { (1, "g0") } else { (3, "g1") };
    w[victim].kill9();
    let (a, b) = tokio::join!(yoco_e2e::server::drain(a), yoco_e2e::server::drain(b));
    assert!(a.tokens.is_empty(), "the kill was meant to land mid-prefill");
    let status = a.status.expect("the request on the killed group must fail");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("rank"), "{status:?}");
    assert_eq!(b.reason(), pb::FinishReason::Length, "the other group's request: {:?}", b.status);

    w[victim] = Worker::start(home.path(), &model, &etcd, group, 1, 2);
    wait_groups(&mut client, &["g0", "g1"], Duration::from_secs(30)).await;
    let _ = client.flush_prefix_cache(pb::FlushPrefixCacheRequest {}).await.unwrap();
    wait_no_cache(w.iter().map(|w| &w.grpc)).await;
}
