//! `yoco coordinator --etcd`: worker groups from membership. Each group goes through
//! idle → forming (connect, LoadModel on every rank) → serving, and back to idle when a rank's
//! registration changes or lapses (its requests end with UNAVAILABLE naming the rank) or its
//! scheduler fails; it forms again as soon as all its ranks are registered.
//!
//! Several coordinators may share a cluster: a group is driven only by the coordinator whose id
//! is in `owners/<G>`, put under that coordinator's lease (compare-and-set, so one wins). A
//! coordinator that drives no group claims an orphaned group at once; one that drives `n`
//! groups waits `n` × [`CLAIM_DELAY`] first, so idle coordinators win and groups spread.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tonic_health::server::HealthReporter;
use yoco_proto::v1::generation_server::GenerationServer;

use crate::api::router::{Ready, Router};
use crate::api::Api;
use crate::cluster::group::{GroupOptions, WorkerGroup};
use crate::cluster::membership::etcd::{self, EtcdConfig, LeaseWatch};
use crate::cluster::membership::{Keys, Members, RankEntry};
use crate::server::starter::GroupStarter;

/// How long a coordinator that drives a group waits, per group, before claiming another.
pub const CLAIM_DELAY: Duration = Duration::from_secs(2);
/// Pause after a group failed to form or failed while serving.
const RETRY: Duration = Duration::from_secs(1);

pub struct ClusterConfig {
    pub etcd: EtcdConfig,
    pub keys: Keys,
    /// This coordinator's id in `owners/<G>`.
    pub id: String,
    /// Model directory the workers load (empty: each worker's own `--model`).
    pub model_dir: Option<String>,
    pub group_options: GroupOptions,
    pub drain_timeout: Duration,
}

enum Phase {
    Idle,
    Backoff(Instant),
    Forming { entries: Vec<RankEntry>, task: JoinHandle<anyhow::Result<WorkerGroup>> },
    Serving { entries: Vec<RankEntry>, ready: Arc<Ready>, task: JoinHandle<()> },
}

struct Cluster {
    cfg: ClusterConfig,
    starter: GroupStarter,
    router: Arc<Router>,
    reporter: HealthReporter,
    serving_reported: Option<bool>,
    members: Members,
    phases: BTreeMap<String, Phase>,
    lease: LeaseWatch,
    client: Option<etcd_client::Client>,
    /// When each group we do not own was first seen without an owner.
    orphaned: HashMap<String, Instant>,
}

/// Runs until `shutdown` resolves, then drains the groups and gives them up.
pub async fn run(
    cfg: ClusterConfig,
    starter: GroupStarter,
    api: &Api,
    reporter: HealthReporter,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut changes = etcd::watch_prefix(cfg.etcd.clone(), cfg.keys.prefix().to_string());
    let lease = etcd::keep_lease(cfg.etcd.clone(), format!("coordinator {}", cfg.id), |_, _| async { Ok(()) });
    tracing::info!(id = %cfg.id, prefix = cfg.keys.prefix(), "watching etcd for worker groups");
    let mut c = Cluster {
        cfg,
        starter,
        router: api.router(),
        reporter,
        serving_reported: None,
        members: Members::default(),
        phases: BTreeMap::new(),
        lease,
        client: None,
        orphaned: HashMap::new(),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            change = changes.recv() => {
                let Some(change) = change else { anyhow::bail!("the etcd watch task stopped") };
                c.members.apply(&c.cfg.keys, change);
                while let Ok(change) = changes.try_recv() {
                    c.members.apply(&c.cfg.keys, change);
                }
            }
            _ = tick.tick() => {}
        }
        c.reconcile().await;
    }
    c.shut_down().await;
    Ok(())
}

impl Cluster {
    async fn reconcile(&mut self) {
        let names: BTreeSet<String> =
            self.members.groups().map(str::to_string).chain(self.phases.keys().cloned()).collect();
        for name in names {
            let phase = self.phases.remove(&name).unwrap_or(Phase::Idle);
            let next = self.step(&name, phase).await;
            if !matches!(next, Phase::Idle) || self.members.groups().any(|g| g == name) {
                self.phases.insert(name, next);
            }
        }
        let serving = self.router.accepting();
        if self.serving_reported != Some(serving) {
            self.serving_reported = Some(serving);
            if serving {
                self.reporter.set_serving::<GenerationServer<Api>>().await;
            } else {
                self.reporter.set_not_serving::<GenerationServer<Api>>().await;
            }
        }
    }

    async fn step(&mut self, name: &str, phase: Phase) -> Phase {
        let want = self.members.complete(name);
        match phase {
            Phase::Serving { entries, ready, task } => {
                if task.is_finished() {
                    self.router.remove(name);
                    tracing::warn!(group = name, "worker group failed; forming it again when its ranks are ready");
                    return Phase::Backoff(Instant::now() + RETRY);
                }
                if want.as_ref() != Some(&entries) {
                    let reason = self.lost(name, &entries);
                    tracing::warn!(group = name, reason = %reason, "taking the group out of service");
                    self.router.remove(name);
                    ready.scheduler.abort(reason);
                    return Phase::Idle;
                }
                if !self.owns(name, true).await {
                    let owner = self.members.owner(name).unwrap_or("nobody").to_string();
                    tracing::warn!(group = name, owner = %owner, "another coordinator owns the group now");
                    self.router.remove(name);
                    ready.scheduler.abort(format!("group {name} passed to coordinator {owner}; retry"));
                    return Phase::Idle;
                }
                Phase::Serving { entries, ready, task }
            }
            Phase::Forming { entries, task } => {
                if want.as_ref() != Some(&entries) {
                    task.abort();
                    tracing::info!(group = name, "membership changed while the group formed; starting over");
                    return Phase::Idle;
                }
                if !task.is_finished() {
                    return Phase::Forming { entries, task };
                }
                let formed = match task.await {
                    Ok(r) => r,
                    Err(e) => Err(anyhow::anyhow!("forming task: {e}")),
                };
                match formed.and_then(|g| self.starter.start(name, g)) {
                    Ok((ready, task)) => {
                        let ready = self.router.insert(ready);
                        tracing::info!(group = name, world = entries.len(), "worker group serving");
                        Phase::Serving { entries, ready, task }
                    }
                    Err(e) => {
                        tracing::warn!(group = name, error = format!("{e:#}"), "worker group did not form; retrying");
                        Phase::Backoff(Instant::now() + RETRY)
                    }
                }
            }
            Phase::Backoff(until) if Instant::now() < until => Phase::Backoff(until),
            Phase::Idle | Phase::Backoff(_) => {
                let Some(entries) = want else { return Phase::Idle };
                if !self.owns(name, false).await {
                    return Phase::Idle;
                }
                let addrs: Vec<String> = entries.iter().map(|e| e.grpc.clone()).collect();
                let collective: Vec<String> = entries.iter().map(|e| e.collective.clone()).collect();
                let (model, opts) = (self.cfg.model_dir.clone(), self.cfg.group_options.clone());
                tracing::info!(group = name, ranks = ?addrs, "all ranks registered; forming the group");
                let task = tokio::spawn(async move {
                    WorkerGroup::connect(&addrs, Some(&collective), model.as_deref(), &opts).await
                });
                Phase::Forming { entries, task }
            }
        }
    }

    /// Which ranks of a serving group left or changed, in words.
    fn lost(&self, name: &str, had: &[RankEntry]) -> String {
        let parts: Vec<String> = had
            .iter()
            .enumerate()
            .filter_map(|(rank, e)| match self.members.rank(name, rank) {
                Some(c) if c == e => None,
                Some(_) => Some(format!("rank {rank} ({}) of group {name} re-registered (it restarted)", e.grpc)),
                None => Some(format!(
                    "rank {rank} ({}) of group {name} was lost: its etcd registration lapsed (process died or cut off)",
                    e.grpc
                )),
            })
            .collect();
        if parts.is_empty() {
            format!("group {name} changed its membership")
        } else {
            parts.join("; ")
        }
    }

    /// Whether we own `name`, claiming it if it has no owner (at once when `serving` it or when
    /// we drive nothing, else after the claim delay).
    async fn owns(&mut self, name: &str, serving: bool) -> bool {
        match self.members.owner(name) {
            Some(o) if o == self.cfg.id => return true,
            Some(_) => {
                self.orphaned.remove(name);
                return false;
            }
            None => {}
        }
        let since = *self.orphaned.entry(name.to_string()).or_insert_with(Instant::now);
        let driven = self.phases.values().filter(|p| !matches!(p, Phase::Idle | Phase::Backoff(_))).count();
        if !serving && since.elapsed() < CLAIM_DELAY * driven as u32 {
            return false;
        }
        let Some(lease) = *self.lease.borrow() else { return serving };
        let (key, id) = (self.cfg.keys.owner(name), self.cfg.id.clone());
        let claimed = match self.client().await {
            Some(client) => etcd::claim(client, &key, &id, lease).await,
            None => return serving,
        };
        match claimed {
            Ok(true) => {
                self.orphaned.remove(name);
                tracing::info!(group = name, id = %self.cfg.id, "claimed the group");
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(group = name, error = %e, "could not claim the group");
                self.client = None;
                // Keep serving through an etcd outage; ownership is settled when it is back.
                serving
            }
        }
    }

    async fn client(&mut self) -> Option<&mut etcd_client::Client> {
        if self.client.is_none() {
            match self.cfg.etcd.connect().await {
                Ok(c) => self.client = Some(c),
                Err(e) => tracing::warn!(error = %e, "cannot reach etcd"),
            }
        }
        self.client.as_mut()
    }

    async fn shut_down(&mut self) {
        tracing::info!(timeout_seconds = self.cfg.drain_timeout.as_secs_f64(), "draining every group");
        self.reporter.set_not_serving::<GenerationServer<Api>>().await;
        let mut tasks = Vec::new();
        for (name, phase) in std::mem::take(&mut self.phases) {
            match phase {
                Phase::Serving { ready, task, .. } => {
                    ready.scheduler.drain(self.cfg.drain_timeout);
                    tasks.push((name, task));
                }
                Phase::Forming { task, .. } => task.abort(),
                _ => {}
            }
        }
        for (name, task) in tasks {
            let _ = task.await;
            self.router.remove(&name);
            let key = self.cfg.keys.owner(&name);
            let id = self.cfg.id.clone();
            if let Some(client) = self.client().await {
                if let Err(e) = etcd::release(client, &key, &id).await {
                    tracing::warn!(group = %name, error = %e, "could not release the group");
                }
            }
        }
        let lease = *self.lease.borrow();
        if let Some(lease) = lease {
            etcd::revoke(&self.cfg.etcd, lease).await;
        }
    }
}

/// A coordinator id unique in the cluster: host, process and start time.
pub fn coordinator_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{host}-{}-{nanos:08x}", std::process::id())
}
