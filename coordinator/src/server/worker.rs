//! `yoco worker`: one rank of a worker group, serving `yoco.worker.v1.Worker` over gRPC.

use std::net::SocketAddr;
use std::path::PathBuf;

use yoco_proto::worker::v1::worker_server::WorkerServer;
use yoco_worker::service::{Device, DeviceRequest, WorkerDefaults, WorkerService};

use crate::cluster::group::MAX_WORKER_MESSAGE_BYTES;
use crate::cluster::membership::etcd::{self, revoke, EtcdConfig, LeaseWatch};
use crate::cluster::membership::{valid_name, Keys, RankEntry, MAX_WORLD};
use crate::net::tls::ServerTlsArgs;

#[derive(clap::Args)]
pub struct Args {
    /// gRPC address to serve on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0", env = "YOCO_WORKER_LISTEN")]
    listen: SocketAddr,
    /// Address the group's collective (TCP) listens on.
    #[arg(long, default_value = "127.0.0.1:0", env = "YOCO_COLLECTIVE_LISTEN")]
    collective_listen: SocketAddr,
    /// Default model directory for LoadModel (default: the built-in model, as `yoco serve`).
    #[arg(long, env = "YOCO_MODEL")]
    model: Option<PathBuf>,
    /// Global KV cache budget of this rank in MiB (LoadModel may override it).
    #[arg(long, default_value_t = 8192, env = "YOCO_CACHE_MIB")]
    cache_mib: usize,
    /// Where this rank computes: `cpu`, `cuda` or `cuda:<n>` (the CUDA backend on that GPU; a
    /// build with the `cuda` feature), or `auto`: a GPU when this build has CUDA and the machine
    /// a GPU, else the CPU (logged). Either runs any `tp × cp` grid. Named in the etcd
    /// registration.
    #[arg(long, default_value = "auto", env = "YOCO_DEVICE", value_parser = DeviceRequest::parse)]
    device: DeviceRequest,
    /// Exit when standard input closes (a local parent that spawned us has gone).
    #[arg(long)]
    exit_on_stdin_close: bool,
    /// Also serve gRPC health (grpc.health.v1, nothing else) in plaintext here: for probes that
    /// cannot do TLS, such as the kubelet's.
    #[arg(long, env = "YOCO_HEALTH_LISTEN")]
    health_listen: Option<SocketAddr>,
    /// TLS on the worker's gRPC; it then requires --tls-client-ca (mutual TLS: only coordinators
    /// holding a certificate that CA signed may drive it). `--allow-plaintext` also covers the
    /// collective, which is never encrypted (like NCCL) and so is refused off loopback without it.
    #[command(flatten)]
    tls: ServerTlsArgs,
    #[command(flatten)]
    membership: Membership,
}

/// Registration in etcd, for coordinators that find their groups there.
#[derive(clap::Args)]
struct Membership {
    /// etcd endpoints (comma-separated): register this rank there under a lease.
    #[arg(long, env = "YOCO_ETCD", value_delimiter = ',', requires_all = ["group", "rank", "world"])]
    etcd: Vec<String>,
    /// Cluster name: the keys live under `/yoco/<cluster>/`.
    #[arg(long, default_value = "default", env = "YOCO_CLUSTER")]
    cluster: String,
    /// Worker group this rank belongs to.
    #[arg(long, env = "YOCO_GROUP")]
    group: Option<String>,
    /// This rank's index in its group (0..world).
    #[arg(long, env = "YOCO_RANK")]
    rank: Option<usize>,
    /// Ranks in the group.
    #[arg(long, env = "YOCO_WORLD")]
    world: Option<usize>,
    /// IP address peers and coordinators reach this worker at, when it listens on 0.0.0.0 (the
    /// pod IP, on Kubernetes).
    #[arg(long, env = "YOCO_ADVERTISE")]
    advertise: Option<std::net::IpAddr>,
    /// Seconds the registration outlives this process: how quickly its loss is noticed.
    #[arg(long, default_value_t = 10, env = "YOCO_LEASE_TTL")]
    lease_ttl: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    if args.tls.tls_cert.is_some() && args.tls.tls_client_ca.is_none() {
        anyhow::bail!(
            "a worker with TLS needs --tls-client-ca: only coordinators holding a certificate it signed may drive it"
        );
    }
    let tls = args.tls.for_listener(args.listen, "the worker's gRPC", &[b"h2"])?;
    if !args.collective_listen.ip().is_loopback() && !args.tls.allow_plaintext {
        anyhow::bail!(
            "the collective (worker-to-worker TCP, like NCCL) is not encrypted: listening on {}, which is not \
             loopback, needs --allow-plaintext; keep it on a network only the group's workers reach (deploy/k8s \
             does so with a NetworkPolicy)",
            args.collective_listen
        );
    }
    let grpc = tokio::net::TcpListener::bind(args.listen).await?;
    let collective = std::net::TcpListener::bind(args.collective_listen)?;
    let device = args.device.resolve();
    tracing::info!(device = %device.device, explicit = device.explicit, "compute device");
    let model_dir = Some(crate::default_model::resolve(args.model.clone())?);
    let defaults = WorkerDefaults { model_dir, cache_budget_bytes: args.cache_mib << 20, device };
    let service = WorkerService::new(defaults, collective);
    let (grpc_addr, collective_addr) = (grpc.local_addr()?, service.collective_addr()?);
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<WorkerServer<WorkerService>>().await;
    // The one line on stdout: how a local parent learns where we listen.
    println!(
        "{}",
        serde_json::json!({"event": "ready", "grpc": grpc_addr.to_string(), "collective": collective_addr.to_string(), "pid": std::process::id()})
    );
    tracing::info!(grpc = %grpc_addr, collective = %collective_addr, "worker ready");
    let registration = register(&args, device.device, grpc_addr, collective_addr)?;
    let server = WorkerServer::new(service)
        .max_decoding_message_size(MAX_WORKER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_WORKER_MESSAGE_BYTES);
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let health_server = match args.health_listen {
        Some(at) => {
            let l = tokio::net::TcpListener::bind(at).await?;
            tracing::info!(health = %l.local_addr()?, "plaintext health endpoint");
            let (stop, health) = (stop.clone(), health.clone());
            Some(tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(health)
                    .serve_with_incoming_shutdown(crate::net::listen::grpc(l), async move { stop.notified().await }),
            ))
        }
        None => None,
    };
    let router = tonic::transport::Server::builder().add_service(health).add_service(server);
    let stopped = super::shutdown::shutdown(args.exit_on_stdin_close);
    match tls {
        Some(cfg) => router.serve_with_incoming_shutdown(crate::net::tls::incoming_stream(grpc, cfg), stopped).await?,
        None => router.serve_with_incoming_shutdown(crate::net::listen::grpc(grpc), stopped).await?,
    }
    stop.notify_one();
    if let Some(task) = health_server {
        task.await??;
    }
    // Leaving cleanly: the registration goes at once instead of when its lease expires.
    if let Some((cfg, lease)) = registration {
        if let Some(id) = *lease.borrow() {
            revoke(&cfg, id).await;
        }
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// Registers this rank in etcd (with `--etcd`); the registration and its live lease.
fn register(
    args: &Args,
    device: Device,
    grpc: SocketAddr,
    collective: SocketAddr,
) -> anyhow::Result<Option<(EtcdConfig, LeaseWatch)>> {
    let m = &args.membership;
    if m.etcd.is_empty() {
        return Ok(None);
    }
    let (Some(group), Some(rank), Some(world)) = (&m.group, m.rank, m.world) else {
        anyhow::bail!("--etcd needs --group, --rank and --world");
    };
    if !valid_name(group) {
        anyhow::bail!("--group `{group}`: use 1 to 63 letters, digits, `-`, `_` or `.`");
    }
    if world == 0 || world > MAX_WORLD || rank >= world {
        anyhow::bail!("--rank {rank} --world {world}: need rank < world <= {MAX_WORLD}");
    }
    if m.lease_ttl == 0 || m.lease_ttl > 3600 {
        anyhow::bail!("--lease-ttl must be 1 to 3600 seconds");
    }
    let keys = Keys::new(&m.cluster).map_err(|e| anyhow::anyhow!(e))?;
    let advertised = |a: SocketAddr| match m.advertise {
        Some(ip) => SocketAddr::new(ip, a.port()),
        None => a,
    };
    let (grpc, collective) = (advertised(grpc), advertised(collective));
    if grpc.ip().is_unspecified() {
        anyhow::bail!("listening on {grpc}: give --advertise with the address peers reach this worker at");
    }
    let entry = RankEntry {
        grpc: grpc.to_string(),
        collective: collective.to_string(),
        world,
        device: device.to_string(),
        cache_mib: args.cache_mib,
        pid: std::process::id(),
    };
    let cfg = EtcdConfig { endpoints: m.etcd.clone(), lease_ttl: m.lease_ttl };
    let lease = etcd::register(cfg.clone(), keys.rank(group, rank), serde_json::to_string(&entry)?);
    Ok(Some((cfg, lease)))
}
