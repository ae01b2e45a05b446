//! `yoco`: the command line of the yoco serving cluster.

use clap::{Parser, Subcommand};
use yoco::cli::{bench, generate_cmd as generate, init_model};
use yoco::net::tls;
use yoco::server::worker as worker_cmd;
use yoco::{client, server as serve};

#[derive(Parser)]
#[command(name = "yoco", version, about = "Serve YOCO (You Only Cache Once) language models")]
struct Cli {
    /// Worker threads for the engine (default: all cores).
    #[arg(long, global = true, env = "YOCO_THREADS")]
    threads: Option<usize>,
    /// Log lines on stderr: `text` (human-readable) or `json` (one object per line). Filter with
    /// `RUST_LOG`.
    #[arg(long, global = true, env = "YOCO_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a model directory with random weights.
    InitModel(init_model::Args),
    /// Generate text for one prompt and print it (or JSON with --json).
    Generate(generate::Args),
    /// Run one rank of a worker group (gRPC `yoco.worker.v1.Worker`).
    Worker(worker_cmd::Args),
    /// Serve the public gRPC API with a group of local worker processes (default: 2 workers,
    /// the built-in model, 127.0.0.1:50051).
    Serve(serve::ServeArgs),
    /// Serve the public gRPC API for workers started elsewhere (`yoco worker`).
    Coordinator(serve::CoordinatorArgs),
    /// Call a running server: generate, tokenize, info.
    Client(client::Args),
    /// Write a private CA, and server and client certificates it signs (PEM), for TLS and
    /// mutual TLS in development clusters and tests.
    Certs(tls::CertsArgs),
    /// Measure the engine: prefill and decode speed, cache bytes per token, machine peak.
    Bench(bench::Args),
}

fn main() -> anyhow::Result<()> {
    // First: it may start the process again, with NCCL loadable by the names cudarc knows.
    #[cfg(feature = "cuda")]
    let nccl_link = yoco_worker::cuda::nccl_lib::make_loadable();
    yoco_worker::alloc::tune_for_inference();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colours only on a terminal: a log file or collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if cli.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    #[cfg(feature = "cuda")]
    if let Some(dir) = nccl_link {
        tracing::info!(dir = %dir.display(), "NCCL: libnccl.so.2 linked as libnccl.so (the names cudarc opens)");
    }
    if let Some(threads) = cli.threads {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    }
    match cli.command {
        Command::InitModel(args) => init_model::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Certs(args) => tls::write_certs(args),
        Command::Worker(args) => worker_cmd::run(args),
        Command::Serve(args) => serve::serve(args),
        Command::Coordinator(args) => serve::coordinator(args),
        Command::Client(args) => client::run(args),
    }
}
