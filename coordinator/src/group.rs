//! A worker group of local processes: spawns P `yoco worker` processes on loopback, loads the
//! model on all of them (which forms their collective), and runs each plan on every rank.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use yoco_proto::worker::v1 as pb;
use yoco_proto::worker::v1::worker_client::WorkerClient;
use yoco_worker::executor::{Plan, SeqResult};
use yoco_worker::generate::{PlanRunner, RunError};
use yoco_worker::service::convert::{plan_to_pb, result_from_pb};

use crate::worker_cmd::MAX_MESSAGE_BYTES;

#[derive(Debug, Clone)]
pub struct GroupOptions {
    pub cache_budget_bytes: usize,
    pub collective_timeout: Duration,
    /// `tcp`, or `nccl` (rank r on GPU r).
    pub transport: String,
}

pub struct LocalGroup {
    /// Held only to be killed when the group is dropped; each worker also exits when its stdin
    /// (held here) closes, should this process die without running destructors.
    _children: Vec<Child>,
    clients: Vec<WorkerClient<Channel>>,
    step_id: u64,
}

impl LocalGroup {
    pub async fn spawn(world: usize, model_dir: &Path, opts: &GroupOptions) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the yoco binary")?;
        let mut children = Vec::new();
        let mut grpc = Vec::new();
        let mut collective = Vec::new();
        for rank in 0..world {
            let mut child = Command::new(&exe)
                .args(["worker", "--exit-on-stdin-close", "--model"])
                .arg(model_dir)
                .env("YOCO_THREADS", std::env::var("YOCO_WORKER_THREADS").unwrap_or_else(|_| "1".into()))
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
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .connect()
                .await
                .with_context(|| format!("connecting to worker rank {rank} at {addr}"))?;
            clients.push(
                WorkerClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            );
        }
        let loads = clients.iter().enumerate().map(|(rank, c)| {
            let mut c = c.clone();
            let req = pb::LoadModelRequest {
                model_dir: String::new(),
                rank: rank as u32,
                world: world as u32,
                peer_addrs: collective.clone(),
                cache_budget_bytes: opts.cache_budget_bytes as u64,
                block_tokens: 0,
                collective_timeout_seconds: opts.collective_timeout.as_secs_f64(),
                transport: opts.transport.clone(),
                device: rank as u32,
            };
            async move { c.load_model(req).await.map_err(|s| anyhow!("rank {rank}: {}", s.message())) }
        });
        for r in futures_join_all(loads).await {
            r?;
        }
        Ok(LocalGroup { _children: children, clients, step_id: 0 })
    }

    pub fn world(&self) -> usize {
        self.clients.len()
    }

    /// Runs `plan` on every rank at once; each rank's results, in rank order.
    pub async fn run_plan(&mut self, plan: &Plan) -> anyhow::Result<Vec<Vec<SeqResult>>> {
        self.step_id += 1;
        let req = plan_to_pb(self.step_id, plan);
        let calls = self.clients.iter().map(|c| {
            let (mut c, req) = (c.clone(), req.clone());
            async move { c.step(req).await }
        });
        let replies = futures_join_all(calls).await;
        // Report every failing rank: the first one alone may only say that a peer was lost.
        let errors: Vec<String> = replies
            .iter()
            .enumerate()
            .filter_map(|(rank, r)| r.as_ref().err().map(|s| format!("rank {rank}: {} ({:?})", s.message(), s.code())))
            .collect();
        if !errors.is_empty() {
            bail!("worker group step failed: {}", errors.join("; "));
        }
        Ok(replies
            .into_iter()
            .map(|r| r.expect("checked").into_inner().results.iter().map(result_from_pb).collect())
            .collect())
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
    group: LocalGroup,
}

impl BlockingGroup {
    pub fn spawn(world: usize, model_dir: &Path, opts: &GroupOptions) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let group = rt.block_on(LocalGroup::spawn(world, model_dir, opts))?;
        Ok(BlockingGroup { rt, group })
    }
}

impl PlanRunner for BlockingGroup {
    fn world(&self) -> usize {
        self.group.world()
    }
    fn run(&mut self, plan: &Plan) -> Result<Vec<Vec<SeqResult>>, RunError> {
        let Self { rt, group } = self;
        rt.block_on(group.run_plan(plan)).map_err(|e| e.into())
    }
}
