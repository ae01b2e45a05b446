//! Worker groups through a real etcd server: `yoco worker --etcd` processes registered as ranks
//! of named groups, and the coordinator's view of the groups it formed (shared by the membership
//! tests and the soak run).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use yoco_proto::v1 as pb;
use yoco_proto::v1::generation_client::GenerationClient;

use crate::etcd::Etcd;
use crate::server::ready_json;
use crate::yoco_bin;

/// How a [`Worker`] is started beside its group, rank and world.
#[derive(Debug, Clone)]
pub struct WorkerOpts {
    /// `--cluster`.
    pub cluster: String,
    /// `--lease-ttl`, seconds.
    pub lease_ttl: u64,
    /// `--cache-mib` (a coordinator's own `--cache-mib` overrides it at LoadModel).
    pub cache_mib: u64,
    /// `YOCO_THREADS`: engine threads.
    pub threads: usize,
}

impl Default for WorkerOpts {
    fn default() -> Self {
        WorkerOpts { cluster: "t".into(), lease_ttl: 2, cache_mib: 256, threads: 1 }
    }
}

/// A `yoco worker` registered in etcd as rank `rank` of `group`; killed when dropped.
pub struct Worker {
    pub child: Child,
    /// gRPC address of its `yoco.worker.v1.Worker` service, from its ready line.
    pub grpc: String,
    /// Its stderr.
    pub log: PathBuf,
}

impl Worker {
    /// A worker with the [`WorkerOpts`] defaults (cluster `t`, lease TTL 2 s, 256 MiB, 1 thread).
    pub fn start(home: &Path, model: &Path, etcd: &Etcd, group: &str, rank: usize, world: usize) -> Worker {
        Self::start_with(home, model, &etcd.endpoint, group, rank, world, &WorkerOpts::default())
    }

    /// Starts the worker, registering with the etcd at `etcd` (`http://host:port`), and reads
    /// its ready line (it registers right after).
    pub fn start_with(
        home: &Path,
        model: &Path,
        etcd: &str,
        group: &str,
        rank: usize,
        world: usize,
        opts: &WorkerOpts,
    ) -> Worker {
        let log = home.join(format!("worker-{group}-{rank}-{}.log", unique()));
        let mut child = Command::new(yoco_bin())
            .args(["worker", "--model", model.to_str().unwrap(), "--cache-mib", &opts.cache_mib.to_string()])
            .args(["--etcd", etcd, "--cluster", &opts.cluster, "--group", group])
            .args(["--lease-ttl", &opts.lease_ttl.to_string()])
            .args(["--rank", &rank.to_string(), "--world", &world.to_string()])
            .env("YOCO_THREADS", opts.threads.to_string())
            .env("RUST_LOG", "info")
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // The worker prints nothing on stdout after this line, so its pipe may close.
        let ready = ready_json(&mut child);
        let grpc = ready["grpc"].as_str().unwrap_or_else(|| panic!("no grpc in {ready}")).to_string();
        Worker { child, grpc, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL (the shell's builtin kill: no procps needed): as sudden as a crash.
    pub fn kill9(&mut self) {
        Command::new("sh").args(["-c", &format!("kill -9 {}", self.child.id())]).status().unwrap();
        let _ = self.child.wait();
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// The groups the coordinator serves now (none when it does not answer).
pub async fn groups(client: &mut GenerationClient<Channel>) -> Vec<pb::GroupStatus> {
    client.model_info(pb::ModelInfoRequest {}).await.map(|r| r.into_inner().groups).unwrap_or_default()
}

/// Waits until the coordinator serves exactly the groups `names` (all accepting).
pub async fn wait_groups(client: &mut GenerationClient<Channel>, names: &[&str], limit: Duration) {
    let started = Instant::now();
    loop {
        let g = groups(client).await;
        if g.iter().map(|g| g.name.as_str()).eq(names.iter().copied()) && g.iter().all(|g| g.accepting) {
            return;
        }
        let seen: Vec<(String, bool)> = g.iter().map(|g| (g.name.clone(), g.accepting)).collect();
        assert!(started.elapsed() < limit, "groups {seen:?}, waiting for {names:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
