//! `yoco worker`: one rank of a worker group, serving `yoco.worker.v1.Worker` over gRPC.

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::io::AsyncReadExt;
use tokio_stream::wrappers::TcpListenerStream;
use yoco_proto::worker::v1::worker_server::WorkerServer;
use yoco_worker::service::{WorkerDefaults, WorkerService};

/// Largest gRPC message a worker accepts or sends.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

#[derive(clap::Args)]
pub struct Args {
    /// gRPC address to serve on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0", env = "YOCO_WORKER_LISTEN")]
    listen: SocketAddr,
    /// Address the group's collective (TCP) listens on.
    #[arg(long, default_value = "127.0.0.1:0", env = "YOCO_COLLECTIVE_LISTEN")]
    collective_listen: SocketAddr,
    /// Default model directory for LoadModel.
    #[arg(long, env = "YOCO_MODEL")]
    model: Option<PathBuf>,
    /// Global KV cache budget of this rank in MiB (LoadModel may override it).
    #[arg(long, default_value_t = 8192, env = "YOCO_CACHE_MIB")]
    cache_mib: usize,
    /// Exit when standard input closes (a local parent that spawned us has gone).
    #[arg(long)]
    exit_on_stdin_close: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let grpc = tokio::net::TcpListener::bind(args.listen).await?;
    let collective = std::net::TcpListener::bind(args.collective_listen)?;
    let defaults = WorkerDefaults { model_dir: args.model.clone(), cache_budget_bytes: args.cache_mib << 20 };
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
    let server = WorkerServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(server)
        .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), shutdown(args.exit_on_stdin_close))
        .await?;
    tracing::info!("worker stopped");
    Ok(())
}

/// Resolves on SIGTERM, Ctrl-C, or (when asked) the end of standard input.
pub async fn shutdown(watch_stdin: bool) {
    let stdin_closed = async {
        if watch_stdin {
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 64];
            while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
        } else {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        #[cfg(unix)]
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
            return;
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
        _ = stdin_closed => {}
    }
}
