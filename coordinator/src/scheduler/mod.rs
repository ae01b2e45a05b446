//! The coordinator's scheduler: continuous batching over one worker group.
//!
//! Each engine step is one plan for every rank: the decode tokens of all running sequences plus
//! prefill chunks of admitted prompts, under a token budget, so a long prefill never freezes the
//! streams of short requests. Prefill chunks go to the prompts with the fewest tokens left
//! first: a short prompt is done in one step even while a million-token prompt is prefilling,
//! and the long one takes what budget remains.
//!
//! Admission books cache: a request reserves, on every rank, the blocks its prompt + max_tokens
//! can occupy (see [`budget`]). Requests that do not fit wait in a bounded FIFO queue; beyond it
//! they are refused. Because of the reservation a step never runs out of cache, so no request
//! is ever preempted or fails half-way for lack of memory.
//!
//! Cancellation (the client dropped its stream, or its deadline passed) is checked before every
//! step; the sequence is freed on every rank in the next plan.
//!
//! With the prefix cache (see [`prefix`]) a request resumes from the workers' latest snapshot of
//! its prompt's longest cached prefix: only the rest is prefilled and booked, and prefill chunks
//! stop at the points where new snapshots are taken.

pub mod detok;
pub mod event;
pub mod request;

pub mod budget;
pub mod prefix;
pub mod prefix_disk;
mod prefix_files;
#[cfg(test)]
mod prefix_tests;
mod seq;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use yoco_worker::engine::{SeqId, SnapshotId};
use yoco_worker::plan::{DecodeWork, Plan, PrefillWork, SeqResult, SeqSpec, SnapshotFiles, SnapshotFilesReport};
use yoco_worker::tokenizer::Tokenizer;

pub use self::budget::Capacity;
use self::event::{End, Event};
use self::prefix::PrefixCache;
pub use self::prefix::{DiskConfig, Hash, PrefixConfig, PrefixStats};
use self::request::{GenRequest, RequestError};
use self::seq::{Active, EventSender};
use crate::cluster::group::StepError;

/// Executes plans on every rank of a group: a [`crate::cluster::group::WorkerGroup`], or an in-process
/// engine in tests.
pub trait StepRunner: Send + 'static {
    /// The ranks that split a prompt's tokens (context-parallel).
    fn cp_size(&self) -> usize;
    /// Per context-parallel rank, in rank order, the results of the plan.
    fn run(&mut self, plan: Plan) -> impl Future<Output = Result<Vec<Vec<SeqResult>>, StepError>> + Send;
    /// The prefix cache's disk-tier work on every rank; each rank's report, in rank order.
    fn snapshot_files(
        &mut self,
        files: SnapshotFiles,
    ) -> impl Future<Output = Result<Vec<SnapshotFilesReport>, StepError>> + Send;
}

impl StepRunner for crate::cluster::group::WorkerGroup {
    fn cp_size(&self) -> usize {
        self.cp()
    }
    async fn run(&mut self, plan: Plan) -> Result<Vec<Vec<SeqResult>>, StepError> {
        self.run_plan(&plan).await
    }
    async fn snapshot_files(&mut self, files: SnapshotFiles) -> Result<Vec<SnapshotFilesReport>, StepError> {
        crate::cluster::group::WorkerGroup::snapshot_files(self, &files).await
    }
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Tokens per engine step: one per decoding sequence plus the prefill chunks.
    pub max_batch_tokens: usize,
    /// Requests that may wait for admission.
    pub max_queue: usize,
    /// Sequences admitted at once (prefilling or decoding).
    pub max_running: usize,
    /// Prompt tokens per rank per step for one sequence (bounds activation memory).
    pub prefill_chunk: usize,
    pub prefix: PrefixConfig,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batch_tokens: 8192,
            max_queue: 1024,
            max_running: 256,
            prefill_chunk: 4096,
            prefix: PrefixConfig::default(),
        }
    }
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.prefix.disk.is_some_and(|d| d.budget_bytes == 0) {
            return Err("the prefix cache's disk tier needs a budget of at least 1 MiB".into());
        }
        if self.max_running == 0 || self.prefill_chunk == 0 {
            return Err("max running sequences and the prefill chunk must be at least 1".into());
        }
        if self.prefix.enabled && self.prefix.snapshot_interval == 0 {
            return Err("the prefix-cache snapshot interval must be at least one block".into());
        }
        if self.max_batch_tokens <= self.max_running {
            return Err(format!(
                "the step token budget ({}) must exceed the running sequences ({}), or prefill could starve",
                self.max_batch_tokens, self.max_running
            ));
        }
        Ok(())
    }
}

const SERVING: u8 = 0;
const DRAINING: u8 = 1;
const DEAD: u8 = 2;

/// What the API sees of the scheduler.
#[derive(Clone)]
pub struct Scheduler {
    cmds: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Shared>,
    abort: Arc<watch::Sender<Option<String>>>,
}

struct Shared {
    state: AtomicU8,
    waiting: AtomicUsize,
    running: AtomicUsize,
    config: SchedulerConfig,
    capacity: Capacity,
    prefix_snapshots: AtomicUsize,
    prefix_blocks: AtomicUsize,
    prefix_disk_snapshots: AtomicUsize,
    prefix_disk_bytes: std::sync::atomic::AtomicU64,
    /// The prefix cache's index as the router reads it (the hashes of the blocks a snapshot
    /// ends at) and the version it was copied at.
    prefix_index: std::sync::RwLock<(u64, std::collections::HashSet<Hash>)>,
}

enum Cmd {
    Submit(Box<GenRequest>, EventSender, Vec<Hash>),
    Drain(Instant),
    FlushPrefix(oneshot::Sender<(usize, usize)>),
}

/// The stream of one request's events; ends after its `Finished` (and error status, if any).
pub type EventStream = mpsc::UnboundedReceiver<Event>;

impl Scheduler {
    /// Starts the scheduling loop over `runner`; it ends when drained or when the group fails.
    pub fn start<R: StepRunner>(
        runner: R,
        tokenizer: Arc<Tokenizer>,
        capacity: Capacity,
        config: SchedulerConfig,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            state: AtomicU8::new(SERVING),
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            prefix_snapshots: AtomicUsize::new(0),
            prefix_blocks: AtomicUsize::new(0),
            prefix_disk_snapshots: AtomicUsize::new(0),
            prefix_disk_bytes: Default::default(),
            prefix_index: Default::default(),
            config,
            capacity,
        });
        let prefix = shared.config.prefix.enabled.then(|| {
            let mut cfg = shared.config.prefix.clone();
            cfg.snapshot_interval = cfg.snapshot_interval.div_ceil(capacity.block_tokens) * capacity.block_tokens;
            PrefixCache::new(capacity, cfg)
        });
        let looper = Loop {
            prefix,
            runner,
            tokenizer,
            cmds: rx,
            shared: shared.clone(),
            waiting: VecDeque::new(),
            active: Vec::new(),
            to_free: Vec::new(),
            next_seq: 1,
            reserved: 0,
            drain_deadline: None,
        };
        let (abort, aborted) = watch::channel(None);
        let task = tokio::spawn(looper.run(aborted));
        (Scheduler { cmds: tx, shared, abort: Arc::new(abort) }, task)
    }

    pub fn capacity(&self) -> Capacity {
        self.shared.capacity
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.shared.config
    }

    /// Requests running and waiting now.
    pub fn load(&self) -> (usize, usize) {
        (self.shared.running.load(Ordering::Relaxed), self.shared.waiting.load(Ordering::Relaxed))
    }

    /// The prefix cache's snapshots and blocks per rank, if it is on.
    pub fn prefix_stats(&self) -> Option<PrefixStats> {
        self.shared.config.prefix.enabled.then(|| PrefixStats {
            snapshots: self.shared.prefix_snapshots.load(Ordering::Relaxed),
            blocks: self.shared.prefix_blocks.load(Ordering::Relaxed),
            disk_snapshots: self.shared.prefix_disk_snapshots.load(Ordering::Relaxed),
            disk_bytes: self.shared.prefix_disk_bytes.load(Ordering::Relaxed),
        })
    }

    /// Drops every cached prefix; returns the snapshots dropped now and those still in use.
    pub async fn flush_prefix_cache(&self) -> Result<(usize, usize), RequestError> {
        let (tx, rx) = oneshot::channel();
        let stopped = || RequestError::Unavailable("the scheduler has stopped".into());
        self.cmds.send(Cmd::FlushPrefix(tx)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    /// Whether new requests are taken (not draining, group not failed).
    pub fn accepting(&self) -> bool {
        self.shared.state.load(Ordering::Relaxed) == SERVING && !self.cmds.is_closed()
    }

    /// Queues a request; its events come on the returned stream.
    pub fn submit(&self, req: GenRequest) -> Result<EventStream, RequestError> {
        self.submit_hashed(req, None)
    }

    /// The chained hashes of a prompt's full blocks, as this group's prefix cache keys them
    /// (none when it is off). Hashing a long prompt takes a while (about 10 ms per million
    /// tokens): callers do it on their own task, never in the scheduling loop.
    pub fn prefix_hashes(&self, prompt: &[u32]) -> Vec<Hash> {
        match &self.shared.config.prefix {
            p if p.enabled => prefix::block_hashes(&p.seed, prompt, self.shared.capacity.block_tokens),
            _ => Vec::new(),
        }
    }

    /// Whether two groups key their prefix caches alike (same model seed and block size), so
    /// that one prompt's [`Scheduler::prefix_hashes`] serve both.
    pub fn same_prefix_keys(&self, other: &Scheduler) -> bool {
        let (a, b) = (&self.shared, &other.shared);
        a.config.prefix.enabled == b.config.prefix.enabled
            && a.config.prefix.seed == b.config.prefix.seed
            && a.capacity.block_tokens == b.capacity.block_tokens
    }

    /// Prompt tokens of the longest prefix of a `len`-token prompt with block `hashes` that a
    /// snapshot of this group holds (what [`PrefixCache::lookup`] would resume from, read
    /// from the copy the loop last published).
    pub fn cached_prefix_tokens(&self, hashes: &[Hash], len: usize) -> usize {
        let bt = self.shared.capacity.block_tokens;
        let index = self.shared.prefix_index.read().unwrap_or_else(|e| e.into_inner());
        prefix::longest_cached(hashes, len, bt, |h| index.1.contains(h)).map_or(0, |k| k * bt)
    }

    /// [`Scheduler::submit`] with the prompt's [`Scheduler::prefix_hashes`] already made.
    pub fn submit_hashed(&self, req: GenRequest, hashes: Option<Vec<Hash>>) -> Result<EventStream, RequestError> {
        match self.shared.state.load(Ordering::Relaxed) {
            SERVING => {}
            DRAINING => return Err(RequestError::Unavailable("the server is shutting down".into())),
            _ => return Err(RequestError::Unavailable("the worker group failed; the server cannot generate".into())),
        }
        let limit = self.shared.config.max_queue;
        if self.shared.waiting.fetch_add(1, Ordering::SeqCst) >= limit {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(RequestError::Busy(format!(
                "the queue is full: {limit} requests are waiting for cache or batch room; retry later"
            )));
        }
        let hashes = hashes.unwrap_or_else(|| self.prefix_hashes(&req.prompt));
        let (tx, rx) = mpsc::unbounded_channel();
        if self.cmds.send(Cmd::Submit(Box::new(req), tx, hashes)).is_err() {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(RequestError::Unavailable("the scheduler has stopped".into()));
        }
        Ok(rx)
    }

    /// Stops taking requests; those in flight may finish until `deadline`, then are cancelled.
    /// The scheduler's task ends when nothing is left.
    pub fn drain(&self, timeout: Duration) {
        let _ = self.shared.state.compare_exchange(SERVING, DRAINING, Ordering::SeqCst, Ordering::SeqCst);
        let _ = self.cmds.send(Cmd::Drain(Instant::now() + timeout));
    }

    /// The group is gone (a rank's membership lapsed): every request ends at once with
    /// UNAVAILABLE and `reason`, even while a step is in flight, and the scheduler stops.
    pub fn abort(&self, reason: String) {
        self.shared.state.store(DEAD, Ordering::SeqCst);
        self.abort.send_replace(Some(reason));
    }
}

/// Resolves once the scheduler is aborted (never, if it cannot be any more).
async fn aborted_with(rx: &mut watch::Receiver<Option<String>>) {
    if rx.wait_for(Option::is_some).await.is_err() {
        std::future::pending::<()>().await;
    }
}

struct Waiting {
    req: Box<GenRequest>,
    tx: EventSender,
    hashes: Vec<Hash>,
}

struct Loop<R> {
    runner: R,
    tokenizer: Arc<Tokenizer>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    shared: Arc<Shared>,
    waiting: VecDeque<Waiting>,
    active: Vec<Active>,
    /// Sequences on the workers to free in the next plan.
    to_free: Vec<SeqId>,
    next_seq: SeqId,
    /// Blocks booked per rank by the active sequences.
    reserved: usize,
    drain_deadline: Option<Instant>,
    prefix: Option<PrefixCache>,
}

/// What each prefill item of a plan was.
struct PrefillRef {
    seq: SeqId,
    tokens: usize,
    /// The snapshot taken after it, and its position.
    snapshot: Option<(SnapshotId, usize)>,
}

impl<R: StepRunner> Loop<R> {
    async fn run(mut self, mut aborted: watch::Receiver<Option<String>>) {
        // The disk tier's files, listed before the first request is looked up.
        self.files(&mut aborted).await;
        loop {
            if let Some(reason) = aborted.borrow_and_update().clone() {
                self.fail_group(StepError { fatal: true, message: reason });
                return;
            }
            let drops = self.prefix.as_ref().is_some_and(PrefixCache::has_work);
            if self.waiting.is_empty() && self.active.is_empty() && self.to_free.is_empty() && !drops {
                if self.drain_deadline.is_some() {
                    self.spill_before_exit(&mut aborted).await;
                    break;
                }
                tokio::select! {
                    cmd = self.cmds.recv() => match cmd {
                        Some(cmd) => self.command(cmd),
                        None => break,
                    },
                    _ = aborted_with(&mut aborted) => continue,
                }
            }
            while let Ok(cmd) = self.cmds.try_recv() {
                self.command(cmd);
            }
            self.reap();
            self.admit();
            self.files(&mut aborted).await;
            let Some((plan, prefills)) = self.compose() else { continue };
            let world = self.runner.cp_size();
            let span = tracing::debug_span!(
                "step",
                prefill = plan.prefill.len(),
                decode = plan.decode.len(),
                tokens = plan.prefill.iter().map(|p| p.tokens.len()).sum::<usize>() + plan.decode.len()
            );
            let kind = match (plan.prefill.is_empty(), plan.decode.is_empty()) {
                (false, false) => "mixed",
                (false, true) => "prefill",
                (true, false) => "decode",
                (true, true) => "free",
            };
            let started = Instant::now();
            let step = tracing::Instrument::instrument(self.runner.run(plan.clone()), span);
            let result = tokio::select! {
                r = step => r,
                // The step may never end (a rank is gone): abandon it with the group.
                _ = aborted_with(&mut aborted) => continue,
            };
            crate::metrics::METRICS.step_seconds.with_label_values(&[kind]).observe(started.elapsed().as_secs_f64());
            match result {
                Ok(results) if results.len() == world => self.apply(&plan, &prefills, results),
                Ok(results) => {
                    self.fail_step(&plan, format!("the group returned {} ranks' results, not {world}", results.len()))
                }
                Err(e) if e.fatal => {
                    self.fail_group(e);
                    return;
                }
                Err(e) => self.fail_step(&plan, e.message),
            }
            self.publish();
        }
        self.publish();
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Submit(req, tx, hashes) => self.waiting.push_back(Waiting { req, tx, hashes }),
            Cmd::Drain(deadline) => self.drain_deadline = Some(deadline),
            Cmd::FlushPrefix(reply) => {
                let outcome = self.prefix.as_mut().map_or((0, 0), PrefixCache::flush);
                tracing::info!(dropped = outcome.0, in_use = outcome.1, "prefix cache flushed");
                // Before the workers free anything: what they report never runs ahead of this.
                self.publish();
                let _ = reply.send(outcome);
            }
        }
    }

    fn publish(&self) {
        if let Some(p) = &self.prefix {
            let stats = p.stats();
            self.shared.prefix_snapshots.store(stats.snapshots, Ordering::Relaxed);
            self.shared.prefix_blocks.store(stats.blocks, Ordering::Relaxed);
            self.shared.prefix_disk_snapshots.store(stats.disk_snapshots, Ordering::Relaxed);
            self.shared.prefix_disk_bytes.store(stats.disk_bytes, Ordering::Relaxed);
            let (version, hashes) = p.index();
            let stale = self.shared.prefix_index.read().unwrap_or_else(|e| e.into_inner()).0 != version;
            if stale {
                *self.shared.prefix_index.write().unwrap_or_else(|e| e.into_inner()) =
                    (version, hashes.copied().collect());
            }
        }
        self.shared.running.store(self.active.len(), Ordering::Relaxed);
        crate::metrics::METRICS.running.set(self.active.len() as i64);
        crate::metrics::METRICS.waiting.set(self.shared.waiting.load(Ordering::Relaxed) as i64);
    }

    /// Drops requests whose client went away or whose deadline passed; past the drain deadline,
    /// everything.
    fn reap(&mut self) {
        let now = Instant::now();
        let draining_over = self.drain_deadline.is_some_and(|d| now >= d);
        let why = |deadline: Option<Instant>, tx: &EventSender| {
            if draining_over {
                Some("the server shut down")
            } else if deadline.is_some_and(|d| now >= d) {
                Some("the request's deadline passed")
            } else if tx.is_closed() {
                Some("the client went away")
            } else {
                None
            }
        };
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for w in std::mem::take(&mut self.waiting) {
            match why(w.req.deadline, &w.tx) {
                Some(reason) => {
                    tracing::info!(request = %w.req.id, reason, "request cancelled while waiting");
                    self.reject(w, End::Cancelled(reason.into()));
                }
                None => kept.push_back(w),
            }
        }
        self.waiting = kept;
        let mut i = 0;
        while i < self.active.len() {
            match why(self.active[i].req.deadline, &self.active[i].tx) {
                Some(reason) => self.end(i, End::Cancelled(reason.into())),
                None => i += 1,
            }
        }
    }

    /// Ends a request that was never admitted.
    fn reject(&self, w: Waiting, end: End) {
        self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
        Active::new(0, *w.req, w.tx, 0, 1, Vec::new()).finish(&end);
    }

    /// Moves waiting requests into the batch, in order, while their cache fits (evicting cached
    /// prefixes nothing uses when that makes room).
    fn admit(&mut self) {
        let cap = self.shared.capacity;
        while let Some(w) = self.waiting.front() {
            let total = w.req.prompt.len() + w.req.max_tokens;
            if cap.blocks_for(total) > cap.blocks_per_rank {
                // Validation keeps such requests out; should one get here, it must not block the queue.
                let w = self.waiting.pop_front().expect("front exists");
                self.reject(
                    w,
                    End::Failed(RequestError::invalid("max_tokens", "the request needs more cache than the group has")),
                );
                continue;
            }
            if self.active.len() >= self.shared.config.max_running {
                break;
            }
            // A longer cached prefix on disk is read back first: the request waits for it (the
            // next file request, before the next step), then finds it in memory.
            if let Some(p) = self.prefix.as_mut().filter(|_| !w.req.prompt_logprobs) {
                if p.restore(&w.hashes, w.req.prompt.len(), self.reserved) {
                    break;
                }
            }
            // Prompt log-probabilities need every prompt position's logits: no resuming.
            let hit = match &mut self.prefix {
                Some(p) if !w.req.prompt_logprobs => p.lookup(&w.hashes, w.req.prompt.len()),
                _ => None,
            };
            // The blocks wholly before the snapshot's position are shared, not booked again.
            let blocks = cap.blocks_for(total) - hit.as_ref().map_or(0, |h| cap.shared_blocks(&h.shards));
            let held = self.prefix.as_ref().map_or(0, PrefixCache::held_blocks);
            let over = (self.reserved + held + blocks).saturating_sub(cap.blocks_per_rank);
            if over > 0 {
                let Some(p) = self.prefix.as_mut() else { break };
                if let Some(h) = &hit {
                    p.pin(h.snap);
                }
                let room = p.evictable() >= over;
                if room {
                    p.evict(over);
                }
                if let Some(h) = &hit {
                    p.unpin(h.snap);
                }
                if !room {
                    break;
                }
            }
            let w = self.waiting.pop_front().expect("front exists");
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            let seq = self.next_seq;
            self.next_seq += 1;
            self.reserved += blocks;
            let cached = hit.as_ref().map_or(0, |h| h.pos);
            if let Some(p) = &mut self.prefix {
                if let Some(h) = &hit {
                    p.pin(h.snap);
                    p.resumed(h.snap);
                }
                let metrics = &crate::metrics::METRICS;
                metrics.prefix_cache_queries.inc_by(w.req.prompt.len() as u64);
                metrics.prefix_cache_hits.inc_by(cached as u64);
                if hit.as_ref().is_some_and(|h| h.from_disk) {
                    metrics.prefix_disk_hits.inc_by(cached as u64);
                }
            }
            let from_disk = hit.as_ref().is_some_and(|h| h.from_disk);
            tracing::info!(request = %w.req.id, seq, prompt_tokens = w.req.prompt.len(), cached, from_disk, blocks, "admitted");
            let mut a = Active::new(seq, *w.req, w.tx, blocks, cap.world, w.hashes);
            if let Some(h) = hit {
                a.resume_from(h.snap, h.pos, h.shards);
            }
            self.active.push(a);
        }
    }

    /// The next step's plan: frees, new sequences, every decode, and prefill chunks under the
    /// token budget (fewest remaining prompt tokens first).
    fn compose(&mut self) -> Option<(Plan, Vec<PrefillRef>)> {
        let world = self.runner.cp_size();
        let config = &self.shared.config;
        let mut plan = Plan {
            free: std::mem::take(&mut self.to_free),
            drop_snapshots: self.prefix.as_mut().map(PrefixCache::take_drops).unwrap_or_default(),
            ..Plan::default()
        };
        for a in self.active.iter_mut().filter(|a| !a.added) {
            a.added = true;
            // Only the repetition penalty looks at prompt tokens the sequence did not prefill.
            let resumed_tokens = match a.head {
                Some(_) if a.req.sampling.repetition_on() => a.req.prompt[..a.cached].to_vec(),
                _ => Vec::new(),
            };
            plan.add.push(SeqSpec {
                seq: a.seq,
                sampling: a.req.sampling.clone(),
                top_logprobs: a.req.top_logprobs,
                prompt_logprobs: a.req.prompt_logprobs,
                request_id: a.req.id.clone(),
                resume_from: a.head.filter(|_| a.cached > 0),
                resumed_tokens,
            });
        }
        for a in &mut self.active {
            if let Some(token) = a.next.take() {
                plan.decode.push(DecodeWork { seq: a.seq, token });
            }
        }
        let mut budget = config.max_batch_tokens.saturating_sub(plan.decode.len());
        let mut order: Vec<usize> = (0..self.active.len()).filter(|&i| self.active[i].remaining_prompt() > 0).collect();
        order.sort_by_key(|&i| (self.active[i].remaining_prompt(), self.active[i].seq));
        let mut prefills = Vec::new();
        for i in order {
            let a = &mut self.active[i];
            let per_rank = if a.req.prompt_logprobs {
                config.prefill_chunk.min(yoco_worker::plan::PROMPT_LOGPROBS_CHUNK)
            } else {
                config.prefill_chunk
            };
            let mut n = a.remaining_prompt().min(per_rank * world).min(budget);
            if n == 0 {
                break;
            }
            // A chunk ends where the next snapshot is due.
            let mut snapshot = None;
            if let Some(p) = &mut self.prefix {
                if let Some(point) = p.next_point(&a.hashes, a.prefilled, a.req.prompt.len()) {
                    if point <= a.prefilled + n {
                        if let Some(id) = p.plan_snapshot(self.reserved) {
                            n = point - a.prefilled;
                            snapshot = Some((id, point));
                        }
                    }
                }
            }
            budget -= n;
            a.prefill_scheduled();
            let end = a.prefilled + n;
            plan.prefill.push(PrefillWork {
                seq: a.seq,
                tokens: a.req.prompt[a.prefilled..end].to_vec(),
                chunk_starts: budget::balanced_starts(&a.shards, n),
                sample: end == a.req.prompt.len(),
                next_token: a.req.prompt.get(end).copied(),
                snapshot: snapshot.map(|(id, _)| id),
            });
            prefills.push(PrefillRef { seq: a.seq, tokens: n, snapshot });
        }
        let empty = plan.add.is_empty()
            && plan.free.is_empty()
            && plan.prefill.is_empty()
            && plan.decode.is_empty()
            && plan.drop_snapshots.is_empty();
        (!empty).then_some((plan, prefills))
    }

    fn index(&self, seq: SeqId) -> Option<usize> {
        self.active.iter().position(|a| a.seq == seq)
    }

    /// Hands each sequence its step's results: progress, tokens, or its end.
    fn apply(&mut self, plan: &Plan, prefills: &[PrefillRef], results: Vec<Vec<SeqResult>>) {
        let tokenizer = self.tokenizer.clone();
        let cap_block = self.shared.capacity.block_tokens;
        let mut ranks = results.into_iter();
        let rank0 = ranks.next().unwrap_or_default();
        let others: Vec<Vec<SeqResult>> = ranks.collect();
        let mut ends = Vec::new();
        let mut answered = std::collections::HashSet::new();
        // Every rank returns one result per item of the same plan, in the same order.
        for (k, r) in rank0.into_iter().enumerate() {
            let Some(i) = self.index(r.seq) else { continue };
            answered.insert(r.seq);
            let a = &mut self.active[i];
            a.shards[0] = r.shard_tokens;
            for (rank, rr) in others.iter().enumerate() {
                if let Some(x) = rr.get(k).filter(|x| x.seq == r.seq) {
                    a.shards[rank + 1] = x.shard_tokens;
                }
            }
            let end = match prefills.iter().find(|p| p.seq == r.seq) {
                Some(p) => {
                    if let (Some((id, pos)), Some(cache)) = (p.snapshot, self.prefix.as_mut()) {
                        let hash = a.hashes[pos / cap_block - 1];
                        cache.insert(id, pos, hash, a.shards.clone(), a.head);
                        a.head = Some(id);
                        a.made.push(id);
                    }
                    a.prefill_done(&tokenizer, p.tokens, &r.prompt_logprobs, r.sampled)
                }
                None => match r.sampled {
                    Some(s) => a.token(&tokenizer, s),
                    None => {
                        Some(End::Failed(RequestError::Internal("the group sampled no token for a decode step".into())))
                    }
                },
            };
            if let Some(end) = end {
                ends.push((r.seq, end));
            }
        }
        // A sequence of the plan without a result would never move again.
        for seq in plan.prefill.iter().map(|p| p.seq).chain(plan.decode.iter().map(|d| d.seq)) {
            if !answered.contains(&seq) {
                ends.push((
                    seq,
                    End::Failed(RequestError::Internal("the group returned no result for the sequence".into())),
                ));
            }
        }
        for (seq, end) in ends {
            if let Some(i) = self.index(seq) {
                self.end(i, end);
            }
        }
    }

    /// Ends active request `i`: its final message, its cache freed on every rank.
    fn end(&mut self, i: usize, end: End) {
        let mut a = self.active.swap_remove(i);
        a.finish(&end);
        self.reserved -= a.blocks;
        if let Some(p) = &mut self.prefix {
            p.sequence_ended(a.head, &a.made);
        }
        if a.added {
            self.to_free.push(a.seq);
        }
        match &end {
            End::Failed(e) => tracing::error!(request = %a.req.id, seq = a.seq, error = %e, "request failed"),
            _ => {
                tracing::info!(request = %a.req.id, seq = a.seq, generated = a.generated, end = ?end, "request finished")
            }
        }
    }

    /// A step the ranks refused without changing anything: its requests fail, the rest go on.
    fn fail_step(&mut self, plan: &Plan, message: String) {
        tracing::error!(error = %message, "step refused by the group");
        let seqs: Vec<SeqId> = plan
            .add
            .iter()
            .map(|s| s.seq)
            .chain(plan.prefill.iter().map(|p| p.seq))
            .chain(plan.decode.iter().map(|d| d.seq))
            .collect();
        // The frees of the plan were applied before the step failed, but freeing is idempotent.
        self.to_free.extend(&plan.free);
        // Likewise the snapshot drops (ids are never reused); snapshots the step was to take
        // may exist on some ranks, so they are dropped too.
        if let Some(p) = &mut self.prefix {
            p.discard(plan.prefill.iter().filter_map(|w| w.snapshot).chain(plan.drop_snapshots.iter().copied()));
        }
        for seq in seqs {
            if let Some(i) = self.index(seq) {
                self.end(i, End::Failed(RequestError::Internal(message.clone())));
            }
        }
    }

    /// The group is broken: every request fails, and no more are taken.
    fn fail_group(&mut self, e: StepError) {
        tracing::error!(error = %e.message, "worker group failed; failing every request");
        self.shared.state.store(DEAD, Ordering::SeqCst);
        let failed = End::Failed(RequestError::Unavailable(e.message.clone()));
        while !self.active.is_empty() {
            self.end(0, failed.clone());
        }
        self.cmds.close();
        while let Ok(cmd) = self.cmds.try_recv() {
            self.command(cmd);
        }
        for w in std::mem::take(&mut self.waiting) {
            self.reject(w, failed.clone());
        }
        self.publish();
    }
}
