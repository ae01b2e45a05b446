//! The scheduler over an in-process engine: batching must not change any request's tokens,
//! short prompts overtake long prefills, cancelled and finished sequences are freed, admission
//! waits for cache, and a broken group fails every request instead of hanging.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use yoco_worker::comm::CommError;
use yoco_worker::engine::{Engine, EngineError, EngineOptions};
use yoco_worker::executor::Executor;
use yoco_worker::generate::{generate, GenerateParams};
use yoco_worker::model::Model;
use yoco_worker::plan::{Plan, SeqResult};
use yoco_worker::sampling::SamplingParams;
use yoco_worker::tokenizer::Tokenizer;

use super::*;
use crate::scheduler::event::{End, Event, Finished};
use crate::scheduler::request::GenRequest;

const BLOCK: usize = 16;

/// A golden-test fixture model: `gret` (gated retention) or `swa` (sliding window).
pub(super) fn fixture(name: &str) -> Arc<Model> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/fixtures").join(name);
    Arc::new(Model::load(&dir).unwrap())
}

fn model() -> Arc<Model> {
    fixture("gret")
}

/// One in-process rank; fails every step from `fail_from` on (a lost group).
struct InProcess {
    exec: Arc<Mutex<Executor>>,
    steps: usize,
    fail_from: Option<usize>,
    /// The disk tier's files, when the configuration has one.
    store: Option<Arc<yoco_worker::snapshot_store::SnapshotStore>>,
}

impl StepRunner for InProcess {
    fn cp_size(&self) -> usize {
        1
    }
    async fn run(&mut self, plan: Plan) -> Result<Vec<Vec<SeqResult>>, StepError> {
        self.steps += 1;
        if self.fail_from.is_some_and(|n| self.steps >= n) {
            let e = EngineError::Comm(CommError::PeerLost { peer: 1 });
            return Err(StepError { fatal: true, message: e.to_string() });
        }
        let exec = self.exec.clone();
        let r = tokio::task::spawn_blocking(move || exec.lock().unwrap().execute(&plan)).await.unwrap();
        r.map(|r| vec![r]).map_err(|e| StepError { fatal: matches!(e, EngineError::Comm(_)), message: e.to_string() })
    }
    async fn snapshot_files(
        &mut self,
        files: yoco_worker::plan::SnapshotFiles,
    ) -> Result<Vec<yoco_worker::plan::SnapshotFilesReport>, StepError> {
        let (exec, store) = (self.exec.clone(), self.store.clone());
        let report = tokio::task::spawn_blocking(move || exec.lock().unwrap().snapshot_files(store.as_deref(), &files));
        Ok(vec![report.await.unwrap()])
    }
}

pub(super) struct Setup {
    pub model: Arc<Model>,
    pub exec: Arc<Mutex<Executor>>,
    pub scheduler: Scheduler,
    pub task: tokio::task::JoinHandle<()>,
}

fn start(config: SchedulerConfig, cache_blocks: usize, fail_from: Option<usize>) -> Setup {
    start_model(model(), config, cache_blocks, fail_from)
}

pub(super) fn start_model(
    model: Arc<Model>,
    config: SchedulerConfig,
    cache_blocks: usize,
    fail_from: Option<usize>,
) -> Setup {
    start_with_disk(model, config, cache_blocks, fail_from, None)
}

/// [`start_model`] with the disk tier's files under `disk` (the configuration's `disk` must
/// be set: its block and state sizes are filled in here).
pub(super) fn start_with_disk(
    model: Arc<Model>,
    mut config: SchedulerConfig,
    cache_blocks: usize,
    fail_from: Option<usize>,
    disk: Option<&std::path::Path>,
) -> Setup {
    let kv = model.cfg.kv_dim();
    let opts = EngineOptions {
        block_tokens: BLOCK,
        cache_budget_bytes: cache_blocks * 2 * BLOCK * kv * 4,
        ..EngineOptions::default()
    };
    let x = Executor::new(Engine::new(model.clone(), &opts));
    let store = disk.map(|dir| Arc::new(x.open_store(dir, "ab".repeat(32)).unwrap()));
    if let Some(d) = &mut config.prefix.disk {
        d.block_bytes = x.engine().pool().block_bytes() as u64;
        d.state_bytes = (model.cfg.self_state_numbers() * 4) as u64;
    }
    let exec = Arc::new(Mutex::new(x));
    let runner = InProcess { exec: exec.clone(), steps: 0, fail_from, store };
    let capacity = Capacity { world: 1, blocks_per_rank: cache_blocks, block_tokens: BLOCK };
    let (scheduler, task) = Scheduler::start(runner, Arc::new(Tokenizer::cl100k()), capacity, config);
    Setup { model, exec, scheduler, task }
}

pub(super) fn prompt(n: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 31 + salt * 7 + 3) % 90) as u32).collect()
}

pub(super) fn request(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> GenRequest {
    GenRequest {
        id: "t".into(),
        prompt,
        max_tokens,
        sampling,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        top_logprobs: 0,
        prompt_logprobs: false,
        arrived: Instant::now(),
        deadline: None,
        hold: None,
    }
}

#[derive(Debug, Default)]
pub(super) struct Outcome {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    text: String,
    progress: Vec<u64>,
    pub finished: Option<Finished>,
    /// When the first token came.
    first_token: Option<Instant>,
    /// When the prefill progress last said a step ended.
    last_progress: Option<Instant>,
}

pub(super) async fn collect(mut rx: EventStream) -> Outcome {
    let mut o = Outcome::default();
    while let Some(item) = rx.recv().await {
        match item {
            Event::Tokens(c) => {
                o.first_token.get_or_insert_with(Instant::now);
                o.tokens.extend(c.tokens.iter().map(|t| t.token));
                o.logprobs.extend(c.tokens.iter().map(|t| t.logprob));
                o.text.push_str(&c.text);
            }
            Event::Progress(p) => {
                o.progress.push(p.prefilled_tokens as u64);
                o.last_progress = Some(Instant::now());
            }
            Event::PromptLogprobs(_) => {}
            Event::Finished(f) => o.finished = Some(f),
        }
    }
    o
}

pub(super) fn end(o: &Outcome) -> &End {
    &o.finished.as_ref().expect("finished").end
}

/// The request alone on a fresh engine, through the plain driver.
fn alone(model: &Arc<Model>, req: &GenRequest) -> Vec<u32> {
    alone_generation(model, req).tokens
}

/// The same, with the log-probabilities (prompt ones too when the request asks).
pub(super) fn alone_generation(model: &Arc<Model>, req: &GenRequest) -> yoco_worker::generate::Generation {
    let mut exec = Executor::new(Engine::new(model.clone(), &EngineOptions::default()));
    let params = GenerateParams {
        max_tokens: req.max_tokens,
        sampling: req.sampling.clone(),
        stop_token_ids: req.stop_token_ids.clone(),
        prompt_logprobs: req.prompt_logprobs,
        ..GenerateParams::default()
    };
    generate(&mut exec, 1, &req.prompt, &params, &mut |_| {}).unwrap()
}

pub(super) fn sequences(s: &Setup) -> usize {
    s.exec.lock().unwrap().engine().sequences()
}

pub(super) async fn wait_until(mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(30), "condition not reached");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_get_the_tokens_each_gets_alone() {
    let s = start(
        SchedulerConfig { max_batch_tokens: 96, max_running: 16, prefill_chunk: 48, ..Default::default() },
        1000,
        None,
    );
    let reqs: Vec<GenRequest> = (0..16)
        .map(|i| {
            let sampling = if i % 2 == 0 {
                SamplingParams::default()
            } else {
                SamplingParams { temperature: 0.8, top_p: 0.9, seed: i as u64, ..SamplingParams::default() }
            };
            request(prompt(5 + i * 13, i), 4 + i % 5, sampling)
        })
        .collect();
    let streams: Vec<_> = reqs.iter().map(|r| s.scheduler.submit(r.clone()).unwrap()).collect();
    let outcomes = futures_all(streams.into_iter().map(collect)).await;
    for (i, (r, o)) in reqs.iter().zip(&outcomes).enumerate() {
        assert_eq!(o.tokens, alone(&s.model, r), "request {i}");
        assert_eq!(end(o), &End::Length);
        let usage = o.finished.as_ref().unwrap().usage;
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (r.prompt.len(), r.max_tokens));
    }
    // Prompts longer than one step's budget reported their progress.
    assert!(outcomes[15].progress.len() >= 2, "{:?}", outcomes[15].progress);
    wait_until(|| sequences(&s) == 0).await;
    drop(s.scheduler);
    s.task.await.unwrap();
}

pub(super) async fn futures_all<F: std::future::Future + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_prompt_overtakes_a_long_prefill() {
    let s = start(
        SchedulerConfig { max_batch_tokens: 40, max_running: 8, prefill_chunk: 32, ..Default::default() },
        1000,
        None,
    );
    let long = s.scheduler.submit(request(prompt(2000, 1), 2, SamplingParams::default())).unwrap();
    let long = tokio::spawn(collect(long));
    // Once the long prompt is under way, a short one arrives.
    wait_until(|| s.exec.lock().unwrap().engine().sequence_len(1).is_some_and(|n| n >= 64)).await;
    let short_req = request(prompt(6, 2), 3, SamplingParams::default());
    let short = collect(s.scheduler.submit(short_req.clone()).unwrap()).await;
    let long = long.await.unwrap();
    assert_eq!(short.tokens, alone(&s.model, &short_req));
    let (short_first, long_first) = (short.first_token.unwrap(), long.first_token.unwrap());
    assert!(short_first < long_first, "the short request waited for the long prefill");
    assert!(short.finished.as_ref().unwrap().timing.time_to_first_token_seconds > 0.0);
    assert!(long.progress.windows(2).all(|w| w[0] < w[1]) && *long.progress.last().unwrap() < 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_frees_its_sequence() {
    let s = start(SchedulerConfig::default(), 10_000, None);
    let mut rx = s.scheduler.submit(request(prompt(50, 3), 100_000, SamplingParams::default())).unwrap();
    // Read a few tokens, then go away.
    let mut seen = 0;
    while seen < 3 {
        match rx.recv().await.expect("the stream ended early") {
            Event::Tokens(_) => seen += 1,
            Event::Finished(f) => panic!("finished early: {f:?}"),
            _ => {}
        }
    }
    assert_eq!(sequences(&s), 1);
    assert!(s.exec.lock().unwrap().engine().pool().used_blocks() > 0);
    drop(rx);
    wait_until(|| sequences(&s) == 0).await;
    // What is left is the prefix cache's snapshot of the prompt; flushed, nothing is held.
    assert_eq!(s.scheduler.flush_prefix_cache().await.unwrap(), (1, 0));
    wait_until(|| s.exec.lock().unwrap().engine().snapshot_usage().0 == 0).await;
    assert_eq!(s.exec.lock().unwrap().engine().pool().used_blocks(), 0);
    assert_eq!(s.scheduler.load(), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_deadline_cancels() {
    let s = start(SchedulerConfig::default(), 10_000, None);
    let mut req = request(prompt(20, 4), 100_000, SamplingParams::default());
    req.deadline = Some(Instant::now() + Duration::from_millis(200));
    let o = collect(s.scheduler.submit(req).unwrap()).await;
    assert!(matches!(end(&o), End::Cancelled(why) if why.contains("deadline")), "{:?}", end(&o));
    wait_until(|| sequences(&s) == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_waits_for_cache_and_the_queue_is_bounded() {
    // 10 blocks of 16: one request of 100 + 20 tokens (8 blocks) at a time.
    let s = start(SchedulerConfig { max_queue: 2, ..Default::default() }, 10, None);
    let reqs: Vec<GenRequest> = (0..3).map(|i| request(prompt(100, i), 20, SamplingParams::default())).collect();
    let a = s.scheduler.submit(reqs[0].clone()).unwrap();
    let b = s.scheduler.submit(reqs[1].clone()).unwrap();
    // Both may still be waiting (the loop has not run): a third may or may not fit the queue of
    // two, but a flood cannot.
    let mut refused = None;
    let mut extra = Vec::new();
    for _ in 0..4 {
        match s.scheduler.submit(reqs[2].clone()) {
            Ok(rx) => extra.push(rx),
            Err(e) => refused = Some(e),
        }
    }
    let refused = refused.expect("the queue should fill");
    assert!(matches!(&refused, RequestError::Busy(m) if m.contains("queue is full")), "{refused:?}");
    let (a, b) = (collect(a).await, collect(b).await);
    assert_eq!(a.tokens, alone(&s.model, &reqs[0]));
    assert_eq!(b.tokens, alone(&s.model, &reqs[1]));
    // b could only start when a's cache was released.
    assert!(b.first_token.unwrap() > a.finished.as_ref().map(|_| a.first_token.unwrap()).unwrap());
    assert!(b.finished.unwrap().timing.queue_seconds > 0.0);
    for rx in extra {
        assert_eq!(end(&collect(rx).await), &End::Length);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_tokens_and_strings() {
    let s = start(SchedulerConfig::default(), 10_000, None);
    let base = request(prompt(30, 5), 12, SamplingParams::default());
    let free_run = collect(s.scheduler.submit(base.clone()).unwrap()).await;
    assert_eq!(free_run.tokens.len(), 12);
    // Stop at the 4th token's id: it is in the output, generation ends there.
    let stop_id = free_run.tokens[3];
    let first = free_run.tokens.iter().position(|&t| t == stop_id).unwrap();
    let o = collect(s.scheduler.submit(GenRequest { stop_token_ids: vec![stop_id], ..base.clone() }).unwrap()).await;
    assert_eq!(o.tokens, free_run.tokens[..=first]);
    assert_eq!(end(&o), &End::StopToken(stop_id));
    // Stop at a piece of the text: the text ends before it.
    let text = &free_run.text;
    let cut = text.char_indices().nth(text.chars().count() / 2).unwrap().0;
    let stop: String = text[cut..].chars().take(2).collect();
    let o = collect(s.scheduler.submit(GenRequest { stop: vec![stop.clone()], ..base.clone() }).unwrap()).await;
    assert_eq!(end(&o), &End::StopString(stop.clone()));
    assert_eq!(o.text, text[..text.find(&stop).unwrap()]);
    wait_until(|| sequences(&s) == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_finishes_work_in_flight_and_refuses_new() {
    let s = start(SchedulerConfig::default(), 10_000, None);
    let req = request(prompt(40, 6), 8, SamplingParams::default());
    let rx = s.scheduler.submit(req.clone()).unwrap();
    s.scheduler.drain(Duration::from_secs(60));
    assert!(matches!(s.scheduler.submit(req.clone()).unwrap_err(), RequestError::Unavailable(_)));
    let o = collect(rx).await;
    assert_eq!(end(&o), &End::Length);
    assert_eq!(o.tokens, alone(&s.model, &req));
    s.task.await.unwrap();

    // Past the drain timeout, what is left is cancelled.
    let s = start(SchedulerConfig::default(), 10_000, None);
    let rx = s.scheduler.submit(request(prompt(40, 6), 100_000, SamplingParams::default())).unwrap();
    s.scheduler.drain(Duration::from_millis(300));
    let o = collect(rx).await;
    assert!(matches!(end(&o), End::Cancelled(_)), "{:?}", end(&o));
    let exec = s.exec.clone();
    s.task.await.unwrap();
    assert_eq!(exec.lock().unwrap().engine().sequences(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_group_ends_every_request_with_an_error() {
    let s = start(SchedulerConfig::default(), 1000, Some(4));
    let streams: Vec<_> =
        (0..3).map(|i| s.scheduler.submit(request(prompt(20, i), 1000, SamplingParams::default())).unwrap()).collect();
    for rx in streams {
        let o = collect(rx).await;
        // Unavailable (the group is gone), saying what failed.
        let failed = matches!(end(&o), End::Failed(RequestError::Unavailable(m)) if m.contains("rank 1"));
        assert!(failed, "{:?}", end(&o));
    }
    s.task.await.unwrap();
    let e = s.scheduler.submit(request(prompt(5, 0), 2, SamplingParams::default())).unwrap_err();
    assert!(matches!(e, RequestError::Unavailable(_)), "{e:?}");
}
