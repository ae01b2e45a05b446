//! A worker group: P `yoco worker` processes, spawned here on loopback or running elsewhere,
//! that load the model together (which forms their collective) and run each plan on every rank.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use yoco_proto::worker::v1 as pb;
use yoco_proto::worker::v1::worker_client::WorkerClient;
use yoco_worker::generate::{PlanRunner, RunError};
use yoco_worker::kernels::kv_block::CacheDtype;
use yoco_worker::plan::{Plan, SeqResult, SnapshotFiles, SnapshotFilesReport};
use yoco_worker::service::convert::{plan_to_pb, result_from_pb};
use yoco_worker::weights::{ComputeDtype, WeightDtype};

/// Largest message of the coordinator-worker protocol, either way: a step's prompt tokens and
/// results (with prompt log-probabilities) are larger than any public request (64 MiB, the
/// public API's limit, holds a million-token prompt).
pub const MAX_WORKER_MESSAGE_BYTES: usize = 256 << 20;

#[derive(Debug, Clone)]
pub struct GroupOptions {
    pub cache_budget_bytes: usize,
    /// Element type of every rank's global KV cache.
    pub cache_dtype: CacheDtype,
    /// Element type every rank keeps the weight matrices in.
    pub weight_dtype: WeightDtype,
    pub collective_timeout: Duration,
    /// `tcp`, or `nccl` (rank r on GPU r).
    pub transport: String,
    /// Mutual TLS to the workers; without it, plaintext (refused off loopback unless allowed).
    pub tls: Option<crate::net::tls::WorkerTls>,
    pub allow_plaintext: bool,
    /// Compute threads of each local worker process; `None`: `YOCO_WORKER_THREADS`, else 1.
    pub local_worker_threads: Option<usize>,
    /// Tensor-parallel size: the group is a `tp × (ranks / tp)` grid.
    pub tp: usize,
    /// Sequences a rank may hold at once (the scheduler's `max_running`); 0: the worker's
    /// default.
    pub max_sequences: usize,
    /// `--device` of each local worker process; `None`: theirs (`YOCO_DEVICE`, else `auto`).
    pub local_device: Option<String>,
    /// The prefix cache's disk tier directory, as every worker sees it (`None`: no tier).
    pub prefix_disk_dir: Option<String>,
    /// The type CPU ranks' large products compute in.
    pub compute_dtype: ComputeDtype,
}

/// Positions per cache block on every rank.
pub const BLOCK_TOKENS: usize = yoco_worker::plan::DEFAULT_BLOCK_TOKENS;
/// After one rank failed a step, how long the others' answers are awaited (to name them).
const ERROR_GRACE: Duration = Duration::from_millis(500);

/// Why a step failed. A fatal failure (a lost worker, a failed collective) breaks the group:
/// every sequence on it is gone. A non-fatal one (a plan a rank refused before running it)
/// changed nothing on any rank.
#[derive(Debug, Clone)]
pub struct StepError {
    pub fatal: bool,
    pub message: String,
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StepError {}

/// One rank as the coordinator sees it after LoadModel.
#[derive(Debug, Clone)]
pub struct RankInfo {
    pub address: String,
    pub cache_capacity_tokens: usize,
    pub block_tokens: usize,
    pub cache_dtype: CacheDtype,
    /// Where the rank computes (`cpu`, `cuda:<n>`).
    pub device: String,
    /// Sequences the rank holds at once; 0: bounded by its cache alone.
    pub max_sequences: usize,
}

/// A formed worker group: P ranks that loaded the model together and run every plan together.
pub struct WorkerGroup {
    /// Local workers, held only to be killed when the group is dropped; each also exits when its
    /// stdin (held here) closes, should this process die without running destructors.
    _children: Vec<Child>,
    clients: Vec<WorkerClient<Channel>>,
    ranks: Vec<RankInfo>,
    model_dir: String,
    config_json: String,
    transport: String,
    step_id: u64,
    /// For errors: `local`, or the group's name in etcd.
    name: String,
    /// A step that no rank ends in this time fails (a rank alone, or all of them, stalled): a
    /// step's compute is bounded by its token budget, so this is generous.
    step_timeout: Duration,
    collective_timeout: Duration,
    /// Ranks per tensor-parallel row.
    tp: usize,
    /// Collective time of the steps so far (each step's slowest rank).
    collectives: CollectiveTotals,
}

/// Time the steps of a group spent in collectives: per step, its slowest rank's.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CollectiveTotals {
    pub steps: usize,
    pub seconds: f64,
    /// Within tensor-parallel rows: the all-reduces, the gathered logits.
    pub tp_seconds: f64,
    /// Within context-parallel columns: states, halos, attention partials.
    pub cp_seconds: f64,
}

/// How the coordinator reaches a group's ranks outside of steps (Info answers at once, even
/// while a step runs).
#[derive(Clone)]
pub struct GroupHandle {
    clients: Vec<WorkerClient<Channel>>,
    pub ranks: Vec<RankInfo>,
    pub model_dir: String,
    pub config_json: String,
    pub transport: String,
}

impl GroupHandle {
    /// Every rank's Info, in rank order.
    pub async fn info(&self) -> anyhow::Result<Vec<pb::InfoResponse>> {
        let calls = self.clients.iter().map(|c| {
            let mut c = c.clone();
            async move { c.info(pb::InfoRequest {}).await }
        });
        futures_join_all(calls)
            .await
            .into_iter()
            .enumerate()
            .map(|(rank, r)| r.map(|r| r.into_inner()).map_err(|s| anyhow!("rank {rank}: {}", s.message())))
            .collect()
    }
}

async fn client(addr: &str, rank: usize, opts: &GroupOptions) -> anyhow::Result<WorkerClient<Channel>> {
    let channel = crate::net::tls::worker_endpoint(addr, opts.tls.as_ref(), opts.allow_plaintext)?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to worker rank {rank} at {addr}"))?;
    Ok(WorkerClient::new(channel)
        .max_decoding_message_size(MAX_WORKER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_WORKER_MESSAGE_BYTES))
}

impl WorkerGroup {
    /// Spawns `world` local `yoco worker` processes and forms the group.
    pub async fn spawn_local(world: usize, model_dir: &Path, opts: &GroupOptions) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the yoco binary")?;
        let mut children = Vec::new();
        let mut grpc = Vec::new();
        let mut collective = Vec::new();
        let threads = match opts.local_worker_threads {
            Some(n) => n.to_string(),
            None => std::env::var("YOCO_WORKER_THREADS").unwrap_or_else(|_| "1".into()),
        };
        for rank in 0..world {
            let mut child = Command::new(&exe)
                .args(["worker", "--exit-on-stdin-close", "--model"])
                .arg(model_dir)
                .args(opts.local_device.iter().flat_map(|d| ["--device", d]))
                .env("YOCO_THREADS", threads.clone())
                // Local workers belong to this process alone, not to a cluster in etcd.
                .env_remove("YOCO_ETCD")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting worker rank {rank}"))?;
            let stdout = child.stdout.take().ok_or_else(|| anyhow!("worker {rank} has no stdout"))?;
            let mut line = String::new();
            tokio::time::timeout(Duration::from_secs(60), BufReader::new(stdout).read_line(&mut line))
                .await
                .map_err(|_| anyhow!("worker rank {rank} did not start within 60 s"))??;
            let ready: serde_json::Value =
                serde_json::from_str(&line).with_context(|| format!("worker rank {rank} said `{}`", line.trim()))?;
            let field =
                |k: &str| ready[k].as_str().map(str::to_string).ok_or_else(|| anyhow!("worker rank {rank}: no `{k}`"));
            grpc.push(field("grpc")?);
            collective.push(field("collective")?);
            children.push(child);
        }
        let mut clients = Vec::new();
        for (rank, addr) in grpc.iter().enumerate() {
            clients.push(client(addr, rank, opts).await?);
        }
        Self::form(children, clients, grpc, collective, String::new(), opts).await
    }

    /// Forms a group of workers that run elsewhere (`yoco worker` processes), given their gRPC
    /// addresses in rank order, and their collective addresses if known (else each reports its
    /// own). Each loads the model directory it was started with, unless `model_dir` names one
    /// (as the workers see it).
    pub async fn connect(
        addrs: &[String],
        collective_addrs: Option<&[String]>,
        model_dir: Option<&str>,
        opts: &GroupOptions,
    ) -> anyhow::Result<Self> {
        let mut clients = Vec::new();
        let mut collective = Vec::new();
        for (rank, addr) in addrs.iter().enumerate() {
            let mut c = client(addr, rank, opts).await?;
            let info = c.info(pb::InfoRequest {}).await.map_err(|s| anyhow!("worker {addr}: {}", s.message()))?;
            let collective_addr = match collective_addrs.and_then(|a| a.get(rank)) {
                Some(a) => a.clone(),
                None => info.into_inner().collective_addr,
            };
            if collective_addr.is_empty() {
                bail!("worker {addr} did not report its collective address");
            }
            collective.push(collective_addr);
            clients.push(c);
        }
        Self::form(Vec::new(), clients, addrs.to_vec(), collective, model_dir.unwrap_or("").to_string(), opts).await
    }

    async fn form(
        children: Vec<Child>,
        clients: Vec<WorkerClient<Channel>>,
        grpc: Vec<String>,
        collective: Vec<String>,
        model_dir: String,
        opts: &GroupOptions,
    ) -> anyhow::Result<Self> {
        let world = clients.len();
        let tp = opts.tp.max(1);
        if !world.is_multiple_of(tp) {
            bail!("--tp {tp} must divide the group's {world} ranks");
        }
        // Names this attempt in the ranks' collective hellos, so that a rank of a stale attempt
        // (one a failed formation left behind) is never taken into this one.
        let formation = rand::random::<u32>();
        tracing::info!(world, formation, transport = %opts.transport, "loading the model on every rank and forming the group");
        let loads = clients.iter().enumerate().map(|(rank, c)| {
            let mut c = c.clone();
            let req = pb::LoadModelRequest {
                model_dir: model_dir.clone(),
                rank: rank as u32,
                world: world as u32,
                peer_addrs: collective.clone(),
                cache_budget_bytes: opts.cache_budget_bytes as u64,
                block_tokens: BLOCK_TOKENS as u32,
                collective_timeout_seconds: opts.collective_timeout.as_secs_f64(),
                transport: opts.transport.clone(),
                device: rank as u32,
                formation,
                cache_dtype: opts.cache_dtype.name().to_string(),
                weight_dtype: opts.weight_dtype.name().to_string(),
                tp: tp as u32,
                max_sequences: opts.max_sequences as u32,
                prefix_disk_dir: opts.prefix_disk_dir.clone().unwrap_or_default(),
                compute_dtype: opts.compute_dtype.name().to_string(),
            };
            async move { (rank, c.load_model(req).await.map_err(|s| anyhow!("rank {rank}: {}", s.message()))) }
        });
        // The first rank to fail fails the formation at once: the others would wait for it at
        // their collective until its timeout. Dropping the set cancels their LoadModel calls,
        // which makes each of those workers give up its half-formed group.
        let mut calls: tokio::task::JoinSet<_> = loads.collect();
        let mut loaded = vec![None; world];
        while let Some(joined) = calls.join_next().await {
            let (rank, r) = joined.map_err(|e| anyhow!("LoadModel task: {e}"))?;
            loaded[rank] = Some(r?.into_inner());
        }
        let mut ranks = Vec::new();
        let (mut dir, mut config_json) = (String::new(), String::new());
        for (loaded, addr) in loaded.into_iter().zip(&grpc) {
            let loaded = loaded.ok_or_else(|| anyhow!("a rank's LoadModel went missing"))?;
            let info = loaded.info.unwrap_or_default();
            tracing::info!(
                rank = info.rank,
                seconds = loaded.load_seconds,
                cache_capacity_tokens = info.cache_capacity_tokens,
                device = %info.device,
                "rank loaded the model"
            );
            let cache_dtype = info.cache_dtype.parse::<CacheDtype>().map_err(|e| anyhow!("rank {}: {e}", info.rank))?;
            if cache_dtype != opts.cache_dtype {
                bail!("rank {} keeps its cache in {cache_dtype}, not the {} asked for", info.rank, opts.cache_dtype);
            }
            if info.tp as usize != tp {
                bail!("rank {} formed a group with tp {}, not the {tp} asked for", info.rank, info.tp);
            }
            ranks.push(RankInfo {
                address: addr.clone(),
                cache_capacity_tokens: info.cache_capacity_tokens as usize,
                block_tokens: BLOCK_TOKENS,
                cache_dtype,
                device: if info.device.is_empty() { "cpu".into() } else { info.device.clone() },
                max_sequences: info.max_sequences as usize,
            });
            if config_json.is_empty() {
                (dir, config_json) = (info.model_dir, info.model_config_json);
            } else if info.model_config_json != config_json {
                bail!("the workers loaded different models ({dir} and {})", info.model_dir);
            }
        }
        Ok(WorkerGroup {
            _children: children,
            clients,
            ranks,
            model_dir: dir,
            config_json,
            transport: if opts.transport.is_empty() { "tcp".into() } else { opts.transport.clone() },
            step_id: 0,
            name: "local".into(),
            step_timeout: (opts.collective_timeout * 2).max(Duration::from_secs(600)),
            collective_timeout: opts.collective_timeout,
            tp,
            collectives: CollectiveTotals::default(),
        })
    }

    /// Ranks of the group (processes).
    pub fn world(&self) -> usize {
        self.clients.len()
    }

    /// Ranks per tensor-parallel row.
    pub fn tp(&self) -> usize {
        self.tp
    }

    /// Ranks that split a prompt's tokens (and the global cache by position): the columns.
    pub fn cp(&self) -> usize {
        self.world() / self.tp
    }

    /// Collective time of the steps so far.
    pub fn collectives(&self) -> CollectiveTotals {
        self.collectives
    }

    /// Names the group in its errors.
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    pub fn handle(&self) -> GroupHandle {
        GroupHandle {
            clients: self.clients.clone(),
            ranks: self.ranks.clone(),
            model_dir: self.model_dir.clone(),
            config_json: self.config_json.clone(),
            transport: self.transport.clone(),
        }
    }

    /// Runs `plan` on every rank at once; the results of each context-parallel rank, in rank
    /// order (a tensor-parallel row's ranks return the same results: its first rank's stand
    /// for the row).
    ///
    /// The ranks of a step end within a collective round of each other (they meet in the
    /// step's collectives), so a rank still silent a collective timeout after another answered
    /// has stalled. A rank that fails the step for any reason but a refusal (a lost peer, a
    /// collective that timed out on a stalled peer) ends it sooner: the others' answers are
    /// awaited only for [`ERROR_GRACE`] more, to name them in the error. A step no rank answers
    /// within the step timeout fails too (every rank stalled, or a group of one).
    pub async fn run_plan(&mut self, plan: &Plan) -> Result<Vec<Vec<SeqResult>>, StepError> {
        use tonic::Code;
        self.step_id += 1;
        let req = plan_to_pb(self.step_id, plan);
        let mut calls = tokio::task::JoinSet::new();
        for (rank, c) in self.clients.iter().enumerate() {
            let (mut c, req) = (c.clone(), req.clone());
            calls.spawn(async move { (rank, c.step(req).await) });
        }
        // A plan refused before it ran is refused by every rank alike; anything else (a rank
        // unreachable, a collective failed) leaves the ranks out of step.
        let refused = |s: &tonic::Status| matches!(s.code(), Code::InvalidArgument | Code::ResourceExhausted);
        let mut replies: Vec<Option<Result<pb::StepResponse, tonic::Status>>> = vec![None; self.world()];
        let mut deadline = tokio::time::Instant::now() + self.step_timeout;
        let mut broken = false;
        loop {
            match tokio::time::timeout_at(deadline, calls.join_next()).await {
                Ok(Some(Ok((rank, r)))) => {
                    let now = tokio::time::Instant::now();
                    deadline = deadline.min(now + self.collective_timeout);
                    if r.as_ref().is_err_and(|s| !refused(s)) && !broken {
                        broken = true;
                        deadline = deadline.min(now + ERROR_GRACE);
                    }
                    replies[rank] = Some(r.map(tonic::Response::into_inner));
                }
                Ok(Some(Err(e))) => return Err(StepError { fatal: true, message: format!("step task failed: {e}") }),
                Ok(None) => break,
                Err(_) => break,
            }
        }
        calls.abort_all();
        let silent: Vec<usize> = (0..self.world()).filter(|&r| replies[r].is_none()).collect();
        let failed: Vec<(usize, &tonic::Status)> = replies
            .iter()
            .enumerate()
            .filter_map(|(rank, r)| r.as_ref().and_then(|r| r.as_ref().err()).map(|s| (rank, s)))
            .collect();
        if !failed.is_empty() || !silent.is_empty() {
            // Report every failing rank: the first one alone may only say that a peer was lost.
            let fatal = !silent.is_empty() || failed.len() != self.world() || failed.iter().any(|(_, s)| !refused(s));
            let mut detail: Vec<String> =
                failed.iter().map(|(rank, s)| format!("rank {rank}: {} ({:?})", s.message(), s.code())).collect();
            let waited = match (broken, silent.len() == self.world()) {
                (true, _) => format!("{ERROR_GRACE:?} of another rank's failure"),
                (false, false) => {
                    format!("the collective timeout ({:?}) of the other ranks' answers", self.collective_timeout)
                }
                (false, true) => format!("the step timeout ({:?})", self.step_timeout),
            };
            detail
                .extend(silent.iter().map(|r| format!("rank {r}: no answer within {waited} (stalled or unreachable)")));
            let message = format!("worker group {} step failed: {}", self.name, detail.join("; "));
            return Err(StepError { fatal, message });
        }
        let replies: Vec<pb::StepResponse> = replies.into_iter().flatten().map(|r| r.expect("checked")).collect();
        // The slowest rank's time in collectives is the group's.
        let slowest = |f: fn(&pb::StepResponse) -> f64| replies.iter().map(f).fold(0.0, f64::max);
        let collective = slowest(|r| r.collective_seconds);
        crate::metrics::METRICS.collective_seconds.observe(collective);
        let c = &mut self.collectives;
        c.steps += 1;
        c.seconds += collective;
        c.tp_seconds += slowest(|r| r.tp_collective_seconds);
        c.cp_seconds += slowest(|r| r.cp_collective_seconds);
        Ok(replies.iter().step_by(self.tp).map(|r| r.results.iter().map(result_from_pb).collect()).collect())
    }
}

impl WorkerGroup {
    /// The disk tier's file work on every rank (see [`SnapshotFiles`]); each rank's report, in
    /// rank order. A rank that does not answer within the step timeout, or answers with an
    /// error, fails the request (fatal when the rank is gone: the scheduler fails the group on
    /// its next step anyway if so).
    pub async fn snapshot_files(&mut self, files: &SnapshotFiles) -> Result<Vec<SnapshotFilesReport>, StepError> {
        let req = yoco_worker::service::convert::snapshot_files_to_pb(files);
        let calls = self.clients.iter().map(|c| {
            let (mut c, req) = (c.clone(), req.clone());
            async move { c.snapshot_files(req).await }
        });
        let replies =
            tokio::time::timeout(self.step_timeout, futures_join_all(calls)).await.map_err(|_| StepError {
                fatal: true,
                message: format!("worker group {}: snapshot files took over {:?}", self.name, self.step_timeout),
            })?;
        replies
            .into_iter()
            .enumerate()
            .map(|(rank, r)| {
                let failed = |message: String| StepError { fatal: false, message: format!("rank {rank}: {message}") };
                let r = r.map_err(|s| failed(s.message().to_string()))?.into_inner();
                yoco_worker::service::convert::snapshot_report_from_pb(&r).map_err(failed)
            })
            .collect()
    }
}

/// Awaits all futures concurrently, keeping every result in order.
async fn futures_join_all<F>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task panicked"));
    }
    out
}

/// A local group driven synchronously (for the command line).
pub struct BlockingGroup {
    rt: tokio::runtime::Runtime,
    group: WorkerGroup,
}

impl BlockingGroup {
    pub fn spawn(world: usize, model_dir: &Path, opts: &GroupOptions) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let group = rt.block_on(WorkerGroup::spawn_local(world, model_dir, opts))?;
        Ok(BlockingGroup { rt, group })
    }
}

impl BlockingGroup {
    pub fn group(&self) -> &WorkerGroup {
        &self.group
    }
}

impl PlanRunner for BlockingGroup {
    fn cp_size(&self) -> usize {
        self.group.cp()
    }
    fn run(&mut self, plan: &Plan) -> Result<Vec<Vec<SeqResult>>, RunError> {
        let Self { rt, group } = self;
        rt.block_on(group.run_plan(plan)).map_err(|e| e.into())
    }
}
