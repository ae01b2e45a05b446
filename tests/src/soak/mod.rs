//! A bounded soak run on loopback that stops by itself: a real etcd, a `yoco coordinator --etcd`
//! and two worker groups of two ranks each serve a tiny model to many concurrent gRPC clients for
//! a fixed time. The clients stream requests of mixed prompt lengths (mostly chat-sized, some of
//! thousands of tokens, rare long ones, a few of 100K+ in long runs), repeat shared documents so
//! that the prefix cache is used, and cancel about one in ten mid-stream. Midway one rank of
//! `g0` is killed with SIGKILL and restarted 10 s later.
//!
//! What is checked (each violation is a failure of the run): only the expected errors (the lost
//! group's UNAVAILABLE, while it was out), no request open past its deadline, requests served by
//! both groups after the kill, no cache or sequence left on any worker once the load stopped and
//! the prefix cache was flushed, no panic in any log, and a bounded growth of the coordinator's
//! resident memory. Latencies, throughput and memory over time are printed as a table.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;
use yoco_proto::v1 as pb;
use yoco_proto::v1::generation_client::GenerationClient;
use yoco_proto::worker::v1 as wpb;
use yoco_proto::worker::v1::worker_client::WorkerClient;

use crate::cluster::{wait_groups, Worker, WorkerOpts};
use crate::etcd::Etcd;
use crate::server::{ids_prompt, Server};

mod report;

use report::summarize;
pub use report::Report;

/// Vocabulary of the soak's model (`init-model --preset tiny`).
pub const VOCAB: usize = 2000;
const GROUPS: [&str; 2] = ["g0", "g1"];
const WORLD: usize = 2;
const LEASE_TTL: u64 = 2;
const CLUSTER: &str = "soak";
/// The rank killed midway: rank 1 of g0 (index into the worker list, group-major).
const VICTIM: usize = 1;
/// Coordinator RSS may grow this much from the first third of the run to its end.
const RSS_GROWTH_FRACTION: f64 = 0.25;
const RSS_GROWTH_MIB: f64 = 50.0;

/// What one soak run does.
#[derive(Debug, Clone)]
pub struct Config {
    /// Seconds the clients keep sending requests.
    pub seconds: u64,
    /// Concurrent clients, each on its own connection, one request at a time.
    pub clients: usize,
    /// Prompts of 100K+ tokens sent over the run (one at a time, spread evenly).
    pub huge: usize,
    pub seed: u64,
    /// A request still open this long after it was sent counts as hung (a failure); huge prompts
    /// get four times as long.
    pub deadline: Duration,
    /// Global KV cache per worker rank (`--cache-mib` of the coordinator and the workers).
    pub cache_mib: u64,
    /// Seconds the killed rank stays down before it is restarted.
    pub down_seconds: u64,
    /// Keep the run's folder (logs) even when it passes (it is always kept when it fails).
    pub keep: bool,
}

impl Config {
    /// `seconds` of load from `clients` clients; runs of two minutes or more include a huge
    /// prompt per minute.
    pub fn new(seconds: u64, clients: usize) -> Config {
        Config {
            seconds,
            clients,
            huge: if seconds >= 120 { (seconds / 60) as usize } else { 0 },
            seed: 1,
            deadline: Duration::from_secs(180),
            cache_mib: 512,
            down_seconds: 10,
            keep: false,
        }
    }

    fn kill_at(&self) -> f64 {
        self.seconds as f64 * 0.35
    }
}

/// A small deterministic generator (SplitMix64): the run needs no `rand`.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// Prompt length classes of the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Chat-sized, 16–256 tokens: most requests.
    Short,
    /// One of 8 shared documents (512–4096 tokens) and a question of its own (16–64 tokens):
    /// after the first, the document comes from the prefix cache.
    Shared,
    /// 2K–8K tokens.
    Medium,
    /// 16K–32K tokens, rare.
    Long,
    /// 100K–128K tokens, a few per run.
    Huge,
}

impl Class {
    const ALL: [Class; 5] = [Class::Short, Class::Shared, Class::Medium, Class::Long, Class::Huge];

    fn lengths(self) -> (usize, usize) {
        match self {
            Class::Short => (16, 256),
            Class::Shared => (512 + 16, 4096 + 64),
            Class::Medium => (2048, 8192),
            Class::Long => (16384, 32768),
            Class::Huge => (100_000, 131_072),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Class::Short => "short 16-256",
            Class::Shared => "shared doc+q",
            Class::Medium => "medium 2K-8K",
            Class::Long => "long 16K-32K",
            Class::Huge => "huge 100K-128K",
        }
    }
}

/// One request a client sends.
struct Spec {
    class: Class,
    prompt: Vec<u32>,
    max_tokens: u32,
    /// Drop the stream once this many tokens came (0: right after the response headers, while
    /// the request waits or its prompt is prefilled).
    cancel_after: Option<usize>,
    temperature: f32,
    seed: u64,
}

fn pick(rng: &mut Rng, huge: bool) -> Spec {
    let class = if huge {
        Class::Huge
    } else {
        match rng.range(0, 99) {
            0..=61 => Class::Short,
            62..=81 => Class::Shared,
            82..=96 => Class::Medium,
            _ => Class::Long,
        }
    };
    let prompt = if class == Class::Shared {
        let doc = rng.range(0, 7);
        let mut p = crate::prompt_ids(512 * (doc + 1), doc, VOCAB);
        let question = rng.range(16, 64);
        p.extend((0..question).map(|_| rng.range(0, VOCAB - 1) as u32));
        p
    } else {
        let (lo, hi) = class.lengths();
        (0..rng.range(lo, hi)).map(|_| rng.range(0, VOCAB - 1) as u32).collect()
    };
    let max_tokens = rng.range(8, 64) as u32;
    let cancel_after = rng.chance(0.10).then(|| rng.range(0, max_tokens as usize / 2));
    let temperature = if rng.chance(0.5) { 0.0 } else { 0.8 };
    Spec { class, prompt, max_tokens, cancel_after, temperature, seed: rng.next_u64() }
}

/// How a request ended, as the client saw it.
#[derive(Debug, Clone)]
enum End {
    /// Finished with reason LENGTH and every token it promised.
    Ok,
    /// The client dropped the stream on purpose.
    Cancelled,
    /// A non-OK status (before the stream or in it).
    Failed { code: Code, message: String },
    /// Still open at its deadline.
    Hung,
    /// Anything else that is wrong: no final message, a wrong finish reason, missing tokens.
    Broken(String),
}

struct Rec {
    id: String,
    class: Class,
    prompt_len: usize,
    /// Seconds since the load started.
    started: f64,
    ended: f64,
    ttft: Option<f64>,
    /// Seconds between tokens (a chunk of n tokens after a gap counts n gaps of gap/n).
    itl: Vec<f64>,
    tokens: usize,
    cached: u64,
    end: End,
}

struct Outcome {
    ttft: Option<f64>,
    itl: Vec<f64>,
    tokens: usize,
    cached: u64,
    end: End,
}

async fn one_request(client: &mut GenerationClient<Channel>, spec: &Spec, id: String) -> Outcome {
    let t0 = Instant::now();
    let req = pb::GenerateRequest {
        prompt: ids_prompt(&spec.prompt),
        max_tokens: Some(spec.max_tokens),
        sampling: Some(pb::SamplingParams {
            temperature: spec.temperature,
            seed: Some(spec.seed),
            ..Default::default()
        }),
        ignore_eos: true,
        request_id: id,
        ..Default::default()
    };
    let mut o = Outcome { ttft: None, itl: Vec::new(), tokens: 0, cached: 0, end: End::Ok };
    let mut stream = match client.generate(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            o.end = End::Failed { code: s.code(), message: s.message().to_string() };
            return o;
        }
    };
    if spec.cancel_after == Some(0) {
        o.end = End::Cancelled;
        return o;
    }
    let mut last: Option<Instant> = None;
    let mut finished: Option<pb::Finished> = None;
    loop {
        match stream.next().await {
            None => break,
            Some(Err(s)) => {
                o.end = End::Failed { code: s.code(), message: s.message().to_string() };
                return o;
            }
            Some(Ok(msg)) => match msg.event {
                Some(pb::generate_response::Event::Tokens(c)) => {
                    let now = Instant::now();
                    let n = c.tokens.len();
                    if n == 0 {
                        continue;
                    }
                    match last {
                        None => o.ttft = Some((now - t0).as_secs_f64()),
                        Some(prev) => {
                            let gap = (now - prev).as_secs_f64() / n as f64;
                            o.itl.extend(std::iter::repeat_n(gap, n));
                        }
                    }
                    last = Some(now);
                    o.tokens += n;
                    if spec.cancel_after.is_some_and(|k| o.tokens >= k) {
                        o.end = End::Cancelled;
                        return o;
                    }
                }
                Some(pb::generate_response::Event::Finished(f)) => finished = Some(f),
                _ => {}
            },
        }
    }
    o.end = match finished {
        None => End::Broken("the stream ended without a final message".into()),
        Some(f) => {
            let usage = f.usage.unwrap_or_default();
            o.cached = usage.cached_prompt_tokens;
            let reason = pb::FinishReason::try_from(f.reason).unwrap_or(pb::FinishReason::Unspecified);
            if reason != pb::FinishReason::Length {
                End::Broken(format!("finished {reason:?} (error {:?}) with an OK status", f.error))
            } else if o.tokens != spec.max_tokens as usize || usage.completion_tokens != o.tokens as u64 {
                End::Broken(format!(
                    "finished LENGTH after {} tokens (usage {}), max_tokens {}",
                    o.tokens, usage.completion_tokens, spec.max_tokens
                ))
            } else if usage.prompt_tokens != spec.prompt.len() as u64 {
                End::Broken(format!(
                    "usage.prompt_tokens {} of a {}-token prompt",
                    usage.prompt_tokens,
                    spec.prompt.len()
                ))
            } else {
                End::Ok
            }
        }
    };
    o
}

/// What the clients and the chaos share.
struct Shared {
    t0: Instant,
    /// Process ids to sample: the coordinator, then g0r0, g0r1, g1r0, g1r1 (None while down).
    pids: Mutex<Vec<Option<u32>>>,
    started: AtomicU64,
    ok: AtomicU64,
    cancelled: AtomicU64,
    failed: AtomicU64,
    /// Huge prompts sent so far, and whether one is in flight.
    huge: Mutex<(usize, bool)>,
    stop_sampling: AtomicBool,
}

impl Shared {
    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// Whether the caller should send the next huge prompt now (then it is in flight).
    fn take_huge(&self, cfg: &Config) -> bool {
        let mut h = self.huge.lock().unwrap();
        let due = cfg.seconds as f64 * (h.0 as f64 + 0.5) / cfg.huge.max(1) as f64;
        if h.0 < cfg.huge && !h.1 && self.now() >= due {
            *h = (h.0 + 1, true);
            true
        } else {
            false
        }
    }
}

async fn connect(addr: &str) -> GenerationClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    GenerationClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
}

async fn client_loop(i: usize, addr: String, cfg: Config, shared: Arc<Shared>) -> Vec<Rec> {
    let mut rng = Rng::new(cfg.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9));
    let mut client = connect(&addr).await;
    let end_at = shared.t0 + Duration::from_secs(cfg.seconds);
    let mut recs = Vec::new();
    let mut n = 0;
    while Instant::now() < end_at {
        let huge = cfg.huge > 0 && shared.take_huge(&cfg);
        let spec = pick(&mut rng, huge);
        let id = format!("soak-c{i}-{n}");
        n += 1;
        shared.started.fetch_add(1, Ordering::Relaxed);
        let started = shared.now();
        let deadline = if huge { cfg.deadline * 4 } else { cfg.deadline };
        let out = tokio::time::timeout(deadline, one_request(&mut client, &spec, id.clone())).await;
        if huge {
            shared.huge.lock().unwrap().1 = false;
        }
        let out = out.unwrap_or(Outcome { ttft: None, itl: Vec::new(), tokens: 0, cached: 0, end: End::Hung });
        let counter = match out.end {
            End::Ok => &shared.ok,
            End::Cancelled => &shared.cancelled,
            _ => &shared.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        recs.push(Rec {
            id,
            class: spec.class,
            prompt_len: spec.prompt.len(),
            started,
            ended: shared.now(),
            ttft: out.ttft,
            itl: out.itl,
            tokens: out.tokens,
            cached: out.cached,
            end: out.end,
        });
    }
    recs
}

/// Resident memory of a process in KiB (`VmRSS` of /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

struct Sample {
    t: f64,
    /// KiB, in the order of [`Shared::pids`].
    rss: Vec<Option<u64>>,
}

async fn sampler(shared: Arc<Shared>) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let pids = shared.pids.lock().unwrap().clone();
        out.push(Sample { t: shared.now(), rss: pids.iter().map(|p| p.and_then(rss_kib)).collect() });
        if shared.stop_sampling.load(Ordering::Relaxed) {
            return out;
        }
    }
}

/// When the chaos happened, in seconds since the load started.
#[derive(Debug, Default, Clone)]
struct Timeline {
    kill: Option<f64>,
    /// The coordinator no longer lists g0 as accepting.
    g0_out: Option<f64>,
    restart: Option<f64>,
    /// g0 accepting again.
    reform: Option<f64>,
}

/// Whether the coordinator says (in an answer, not by failing to answer) that g0 is accepting.
async fn g0_accepting(client: &mut GenerationClient<Channel>) -> Option<bool> {
    let info = client.model_info(pb::ModelInfoRequest {}).await.ok()?.into_inner();
    Some(info.groups.iter().any(|g| g.name == "g0" && g.accepting))
}

/// Kills rank 1 of g0 at the kill time, restarts it `down_seconds` later with the same flags,
/// and waits for g0 to serve again.
async fn chaos(
    cfg: Config,
    shared: Arc<Shared>,
    workers: Arc<Mutex<Vec<Option<Worker>>>>,
    logs: Arc<Mutex<Vec<PathBuf>>>,
    restart: impl FnOnce() -> Worker + Send + 'static,
    addr: String,
) -> Result<Timeline, String> {
    let mut t = Timeline::default();
    let mut client = connect(&addr).await;
    tokio::time::sleep_until((shared.t0 + Duration::from_secs_f64(cfg.kill_at())).into()).await;
    {
        let mut w = workers.lock().unwrap();
        let mut victim = w[VICTIM].take().expect("the victim runs");
        victim.kill9();
        shared.pids.lock().unwrap()[1 + VICTIM] = None;
    }
    let kill = shared.now();
    t.kill = Some(kill);
    eprintln!("soak: t={kill:.1}s: killed g0 rank 1 (SIGKILL)");
    let restart_at = shared.t0 + Duration::from_secs_f64(kill + cfg.down_seconds as f64);
    while Instant::now() < restart_at {
        if t.g0_out.is_none() && g0_accepting(&mut client).await == Some(false) {
            t.g0_out = Some(shared.now());
            eprintln!("soak: t={:.1}s: g0 out of service", shared.now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let w = tokio::task::spawn_blocking(restart).await.map_err(|e| format!("restarting the worker: {e}"))?;
    logs.lock().unwrap().push(w.log.clone());
    shared.pids.lock().unwrap()[1 + VICTIM] = Some(w.pid());
    workers.lock().unwrap()[VICTIM] = Some(w);
    t.restart = Some(shared.now());
    eprintln!("soak: t={:.1}s: restarted g0 rank 1", shared.now());
    let limit = Instant::now() + Duration::from_secs(90);
    while Instant::now() < limit {
        if g0_accepting(&mut client).await == Some(true) {
            t.reform = Some(shared.now());
            eprintln!("soak: t={:.1}s: g0 serving again", shared.now());
            return Ok(t);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("g0 did not serve again within 90 s of its rank's restart (t={:.1}s)", shared.now()))
}

/// The `request` log lines of the coordinator (JSON): request id to the group it was routed to.
fn routed_groups(log: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let f = &v["fields"];
        if f["message"] == "request" {
            if let (Some(id), Some(g)) = (f["request"].as_str(), f["group"].as_str()) {
                out.insert(id.to_string(), g.to_string());
            }
        }
    }
    out
}

/// The kind of an error the soak expects from the lost group, or None for any other.
fn expected_kind(code: Code, message: &str) -> Option<&'static str> {
    if code != Code::Unavailable {
        return None;
    }
    if message.contains("step failed") && message.contains("rank ") {
        Some("step failed, naming the rank")
    } else if message.contains("was lost") && message.contains("rank ") {
        Some("rank lost (etcd registration lapsed)")
    } else if message.contains("the worker group failed") {
        Some("worker group failed")
    } else if message.contains("the scheduler has stopped") {
        Some("scheduler stopped")
    } else {
        None
    }
}

/// Per-rank state on a worker, from its own Info.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    cache_used_bytes: u64,
    sequences: u32,
    snapshots: u32,
}

async fn worker_held(addr: &str) -> Result<Held, String> {
    let mut c = WorkerClient::connect(format!("http://{addr}")).await.map_err(|e| format!("{addr}: {e}"))?;
    let i = c.info(wpb::InfoRequest {}).await.map_err(|s| format!("{addr}: {s}"))?.into_inner();
    Ok(Held { cache_used_bytes: i.cache_used_bytes, sequences: i.sequences, snapshots: i.snapshots })
}

/// Runs the soak and returns its report; the processes are gone when it returns.
pub async fn run(cfg: &Config) -> Report {
    assert!(cfg.seconds >= 30, "a soak needs at least 30 s (the kill, the rank's 10 s down, the re-form)");
    let home = tempfile::Builder::new().prefix("yoco-soak-").tempdir().expect("a temporary folder");
    let mut failures = Vec::new();
    let text = run_in(cfg, home.path(), &mut failures).await;
    let kept = (cfg.keep || !failures.is_empty()).then(|| home.keep());
    Report { text, failures, kept }
}

async fn run_in(cfg: &Config, home: &Path, failures: &mut Vec<String>) -> String {
    let setup = Instant::now();
    let model = crate::init_tiny_model(home, VOCAB);
    let etcd = Etcd::start(home);
    let opts = WorkerOpts { cluster: CLUSTER.into(), lease_ttl: LEASE_TTL, cache_mib: cfg.cache_mib, threads: 1 };
    let names: Vec<String> =
        GROUPS.iter().flat_map(|g| (0..WORLD).map(move |r| format!("{g}r{r}"))).collect::<Vec<_>>();
    let mut list = Vec::new();
    for g in GROUPS {
        for r in 0..WORLD {
            list.push(Some(Worker::start_with(home, &model, &etcd.endpoint, g, r, WORLD, &opts)));
        }
    }
    let cache_mib = cfg.cache_mib.to_string();
    let ttl = LEASE_TTL.to_string();
    let server = Server::spawn_with_env(
        home,
        &[
            "coordinator",
            "--etcd",
            &etcd.endpoint,
            "--cluster",
            CLUSTER,
            "--lease-ttl",
            &ttl,
            "--cache-mib",
            &cache_mib,
        ],
        &[("YOCO_LOG_FORMAT", "json")],
    );
    server.wait_serving(Duration::from_secs(120)).await;
    let mut admin = server.client().await;
    wait_groups(&mut admin, &GROUPS, Duration::from_secs(120)).await;
    let setup = setup.elapsed().as_secs_f64();
    let logs = Arc::new(Mutex::new(list.iter().map(|w| w.as_ref().unwrap().log.clone()).collect::<Vec<_>>()));
    let pids =
        std::iter::once(server.child.id()).chain(list.iter().map(|w| w.as_ref().unwrap().pid())).map(Some).collect();
    let workers = Arc::new(Mutex::new(list));
    let shared = Arc::new(Shared {
        t0: Instant::now(),
        pids: Mutex::new(pids),
        started: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        cancelled: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        huge: Mutex::new((0, false)),
        stop_sampling: AtomicBool::new(false),
    });
    eprintln!(
        "soak: cluster up in {setup:.1}s (run folder {}); {} clients for {} s",
        home.display(),
        cfg.clients,
        cfg.seconds
    );

    let sampler = tokio::spawn(sampler(shared.clone()));
    let restart = {
        let (home, model, endpoint, opts) = (home.to_path_buf(), model.clone(), etcd.endpoint.clone(), opts.clone());
        move || Worker::start_with(&home, &model, &endpoint, "g0", VICTIM % WORLD, WORLD, &opts)
    };
    let chaos =
        tokio::spawn(chaos(cfg.clone(), shared.clone(), workers.clone(), logs.clone(), restart, server.addr.clone()));
    let clients: Vec<_> = (0..cfg.clients)
        .map(|i| tokio::spawn(client_loop(i, server.addr.clone(), cfg.clone(), shared.clone())))
        .collect();
    let progress = {
        let (shared, seconds) = (shared.clone(), cfg.seconds);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(15)).await;
                let (s, ok, c, f) = (
                    shared.started.load(Ordering::Relaxed),
                    shared.ok.load(Ordering::Relaxed),
                    shared.cancelled.load(Ordering::Relaxed),
                    shared.failed.load(Ordering::Relaxed),
                );
                eprintln!(
                    "soak: t={:.0}s/{seconds}: started {s}, ok {ok}, cancelled {c}, failed {f}, open {}",
                    shared.now(),
                    s - ok - c - f
                );
            }
        })
    };

    // Every client ends its last request by its deadline; a client task that outlives that by
    // a minute is a bug of the harness, reported, not waited for.
    let mut recs: Vec<Rec> = Vec::new();
    let join_limit = Instant::now() + Duration::from_secs(cfg.seconds) + cfg.deadline * 4 + Duration::from_secs(60);
    for (i, c) in clients.into_iter().enumerate() {
        match tokio::time::timeout_at(join_limit.into(), c).await {
            Ok(Ok(r)) => recs.extend(r),
            Ok(Err(e)) => failures.push(format!("client {i} failed: {e}")),
            Err(_) => failures.push(format!("client {i} did not end")),
        }
    }
    let load_end = shared.now();
    progress.abort();
    let timeline = match chaos.await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            failures.push(e);
            Timeline::default()
        }
        Err(e) => {
            failures.push(format!("the chaos task failed: {e}"));
            Timeline::default()
        }
    };
    eprintln!("soak: t={load_end:.1}s: every request ended; checking the cluster");

    // After the load: both groups serve, hold no request, and once the prefix cache is flushed,
    // no rank holds cache, sequences or snapshots.
    let mut after = String::new();
    let both = tokio::time::timeout(Duration::from_secs(60), wait_groups(&mut admin, &GROUPS, Duration::from_secs(60)));
    if both.await.is_err() {
        failures.push("both groups did not serve again after the load".into());
    }
    match admin.flush_prefix_cache(pb::FlushPrefixCacheRequest {}).await {
        Ok(r) => {
            let r = r.into_inner();
            let _ = writeln!(after, "prefix cache flush: {} snapshots dropped, {} in use", r.dropped, r.in_use);
        }
        Err(s) => failures.push(format!("FlushPrefixCache failed: {s}")),
    }
    let addresses: Vec<String> =
        workers.lock().unwrap().iter().map(|w| w.as_ref().map_or(String::new(), |w| w.grpc.clone())).collect();
    let flushed = Instant::now();
    let mut held: Vec<Result<Held, String>>;
    loop {
        held = Vec::new();
        for a in &addresses {
            held.push(worker_held(a).await);
        }
        let zero = Held { cache_used_bytes: 0, sequences: 0, snapshots: 0 };
        if held.iter().all(|h| h.as_ref() == Ok(&zero)) {
            let _ = writeln!(
                after,
                "every rank back to 0 cache bytes, 0 sequences, 0 snapshots {:.2} s after the flush",
                flushed.elapsed().as_secs_f64()
            );
            break;
        }
        if flushed.elapsed() > Duration::from_secs(30) {
            for (name, h) in names.iter().zip(&held) {
                let _ = writeln!(after, "  {name}: {h:?}");
                if h.as_ref() != Ok(&zero) {
                    failures.push(format!("{name} still holds 30 s after the load and the flush: {h:?}"));
                }
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let info = admin.model_info(pb::ModelInfoRequest {}).await.map(|r| r.into_inner());
    match &info {
        Ok(info) => {
            for g in &info.groups {
                if g.running != 0 || g.waiting != 0 {
                    failures
                        .push(format!("group {} still counts {} running, {} waiting", g.name, g.running, g.waiting));
                }
            }
            if info.prefix_cache_snapshots != 0 {
                failures.push(format!("{} prefix-cache snapshots after the flush", info.prefix_cache_snapshots));
            }
        }
        Err(s) => failures.push(format!("ModelInfo after the load: {s}")),
    }
    if server.health().await != Some(tonic_health::pb::health_check_response::ServingStatus::Serving) {
        failures.push("the coordinator is not SERVING after the load".into());
    }
    shared.stop_sampling.store(true, Ordering::Relaxed);
    let samples = sampler.await.unwrap_or_default();

    let coordinator_log = server.stderr();
    let mut all_logs = vec![(String::from("coordinator"), server.stderr_path.clone())];
    all_logs.extend(
        logs.lock().unwrap().iter().map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), p.clone())),
    );
    for (name, path) in &all_logs {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("panicked")) {
            failures.push(format!("{name} panicked: {line}"));
        }
    }
    drop(server);
    drop(workers);
    drop(etcd);

    let routed = routed_groups(&coordinator_log);
    let mut text = String::new();
    summarize(cfg, &recs, &routed, &timeline, &samples, load_end, setup, &names, failures, &mut text);
    text.push_str(&after);
    text
}
