//! `yoco serve` (a coordinator with its own local workers) and `yoco coordinator` (a coordinator
//! for workers started elsewhere): the public gRPC API, health and reflection, the scheduler,
//! and graceful shutdown.
//!
//! The server listens at once and answers health with NOT_SERVING while the worker group forms,
//! SERVING when it can generate, and NOT_SERVING again while draining or after the group failed.
//! On SIGTERM or Ctrl-C it stops taking requests, lets those in flight finish within the drain
//! timeout (then cancels them), and exits 0. A static group (`serve`, `coordinator --worker`)
//! that fails ends every request with an error and the process exits non-zero, so that a
//! supervisor restarts it; with `--etcd` (see [`crate::server::dynamic`]) groups come and go while the
//! coordinator keeps serving with the others.

pub mod dynamic;
pub mod shutdown;
pub mod starter;
pub mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tonic::service::interceptor::InterceptedService;
use yoco_proto::v1::generation_server::GenerationServer;
use yoco_worker::config::ModelConfig;
use yoco_worker::kernels::kv_block::CacheDtype;
use yoco_worker::tokenizer::Tokenizer;
use yoco_worker::weights::{ComputeDtype, WeightDtype};

use self::starter::GroupStarter;
use crate::api::auth::ApiKeys;
use crate::api::chat_template::ChatTemplate;
use crate::api::limits::RequestLimits;
use crate::api::{Api, MAX_MESSAGE_BYTES};
use crate::cluster::group::{GroupOptions, WorkerGroup};
use crate::cluster::membership::etcd::EtcdConfig;
use crate::cluster::membership::Keys;
use crate::net::tls::{ServerTlsArgs, WorkerTls, WorkerTlsArgs};
use crate::scheduler::{DiskConfig, PrefixConfig, SchedulerConfig};
use crate::server::dynamic::ClusterConfig;

/// Settings shared by `serve` and `coordinator`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// Address of the public gRPC API (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:50051", env = "YOCO_LISTEN")]
    listen: SocketAddr,
    /// Address of the OpenAI-compatible HTTP API, `/health`, `/ready` (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:8000", env = "YOCO_HTTP_LISTEN")]
    http_listen: SocketAddr,
    /// Global KV cache budget per worker rank, in MiB.
    #[arg(long, default_value_t = 4096, env = "YOCO_CACHE_MIB")]
    cache_mib: usize,
    /// Element type of the global KV cache: f32, bf16 or f16 (half the bytes per token; the
    /// kernels compute in f32).
    #[arg(long, default_value = "f32", env = "YOCO_CACHE_DTYPE")]
    cache_dtype: CacheDtype,
    /// Element type of the weight matrices: auto (as the checkpoint stores them, memory-mapped),
    /// f32, bf16 or f16 (converted at load; half the bytes of f32). The kernels compute in f32.
    #[arg(long, default_value = "auto", env = "YOCO_WEIGHT_DTYPE")]
    weight_dtype: WeightDtype,
    /// The type CPU workers' large matrix products (prefill) compute in: f32, bf16 (activations
    /// rounded to bf16, bf16 weights — converted at load —, f32 accumulation: twice the f32
    /// rate with AVX512_BF16, more on AMX tiles; needs one of them) or auto (as the checkpoint's
    /// weights).
    /// Norms, retention states, attention and logits stay f32.
    #[arg(long, default_value = "f32", env = "YOCO_COMPUTE_DTYPE")]
    compute_dtype: ComputeDtype,
    /// Requests that may wait for admission; beyond it, RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024, env = "YOCO_MAX_QUEUE")]
    max_queue: usize,
    /// Tokens per engine step (decode tokens plus prefill chunks).
    #[arg(long, default_value_t = 8192, env = "YOCO_MAX_BATCH_TOKENS")]
    max_batch_tokens: usize,
    /// Sequences running at once.
    #[arg(long, default_value_t = 256, env = "YOCO_MAX_RUNNING")]
    max_running: usize,
    /// Prompt tokens per rank per step for one sequence.
    #[arg(long, default_value_t = 4096, env = "YOCO_PREFILL_CHUNK")]
    prefill_chunk: usize,
    /// Seconds in-flight requests may take to finish after SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30.0, env = "YOCO_DRAIN_TIMEOUT")]
    drain_timeout: f64,
    /// Seconds a collective waits for a peer before the group fails.
    #[arg(long, default_value_t = 120.0, env = "YOCO_COLLECTIVE_TIMEOUT")]
    collective_timeout: f64,
    /// Log every request's prompt (by default logs never carry prompt text).
    #[arg(long, env = "YOCO_LOG_PROMPTS")]
    log_prompts: bool,
    /// Collective transport between the workers: tcp, or nccl (needs the `cuda` feature).
    #[arg(long, default_value = "tcp", env = "YOCO_TRANSPORT")]
    transport: String,
    /// Tensor-parallel size: each worker group is a `tp × cp` grid whose rows split the
    /// weights (heads, FFN columns, vocabulary) and whose columns split the tokens. It must
    /// divide the group's ranks and the model's heads, KV heads and FFN width.
    #[arg(long, default_value_t = 1, env = "YOCO_TP")]
    tp: usize,
    /// Turn the prefix cache off (on by default: requests sharing a prompt prefix with an
    /// earlier one resume from the workers' snapshot of it instead of prefilling it again).
    #[arg(long, env = "YOCO_NO_PREFIX_CACHE")]
    no_prefix_cache: bool,
    /// Inside long prompts, keep a prefix-cache snapshot every this many tokens (rounded up to
    /// whole cache blocks); each prompt's end is always snapshotted.
    #[arg(long, default_value_t = 8192, env = "YOCO_PREFIX_SNAPSHOT_INTERVAL")]
    prefix_snapshot_interval: usize,
    /// The prefix cache's disk tier: snapshots evicted from memory are written here (each
    /// worker its own files, under a folder per model, group layout and rank) and read back
    /// on a hit instead of prefilling; a restarted server finds them again. The path is as the
    /// workers see it (a local or per-pod volume).
    #[arg(long, env = "YOCO_PREFIX_DISK_DIR")]
    prefix_disk_dir: Option<PathBuf>,
    /// Bytes of the disk tier per worker, in MiB; the least recently used snapshots go first.
    #[arg(long, default_value_t = 16384, env = "YOCO_PREFIX_DISK_MIB")]
    prefix_disk_mib: u64,
    /// Global-cache memory per worker, in MiB, that prefix-cache snapshots may keep once their
    /// requests end (default: whatever running requests leave free). With the disk tier, 0
    /// keeps cached prefixes on disk only, leaving memory to running requests.
    #[arg(long, env = "YOCO_PREFIX_MEMORY_MIB")]
    prefix_memory_mib: Option<u64>,
    /// How requests are spread over several groups: `cache-aware` (to the group caching the
    /// longest prefix of the prompt, within --route-balance-threshold of the least loaded) or
    /// `least-loaded` (ignoring caches, as a plain load balancer does).
    #[arg(long, value_enum, default_value_t = crate::api::router::RoutePolicy::CacheAware, env = "YOCO_ROUTE_POLICY")]
    route_policy: crate::api::router::RoutePolicy,
    /// With several groups, a prompt goes to the group caching its longest prefix unless that
    /// group has more than this many requests (running + waiting) beyond the least-loaded one.
    #[arg(long, default_value_t = crate::api::router::DEFAULT_BALANCE_THRESHOLD, env = "YOCO_ROUTE_BALANCE_THRESHOLD")]
    route_balance_threshold: usize,
    /// File of API keys, one per line (re-read when it changes): every public endpoint but the
    /// health probes then needs `authorization: Bearer <key>`. Keys may also come, comma-
    /// separated, in the environment variable YOCO_API_KEYS.
    #[arg(long, env = "YOCO_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// Streams one API key may have open at once (0: no limit); beyond, RESOURCE_EXHAUSTED / 429.
    #[arg(long, default_value_t = 0, env = "YOCO_MAX_STREAMS_PER_KEY")]
    max_streams_per_key: usize,
    /// Longest prompt in tokens (0: what the cache holds).
    #[arg(long, default_value_t = 0, env = "YOCO_MAX_PROMPT_TOKENS")]
    max_prompt_tokens: usize,
    /// Seconds a request may take in all, queueing included (0: no limit); a client's shorter
    /// `grpc-timeout` wins. Past it, the request is cancelled.
    #[arg(long, default_value_t = 0.0, env = "YOCO_REQUEST_TIMEOUT")]
    request_timeout: f64,
    /// Also serve gRPC health (grpc.health.v1, nothing else) in plaintext here: for probes that
    /// cannot do TLS, such as the kubelet's.
    #[arg(long, env = "YOCO_HEALTH_LISTEN")]
    health_listen: Option<SocketAddr>,
    #[command(flatten)]
    tls: ServerTlsArgs,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Model directory; default: the built-in default model (trained by tools/train/).
    #[arg(long, env = "YOCO_MODEL")]
    model: Option<PathBuf>,
    /// Local worker processes (ranks of the group); default 2, or `--tp` × `--cp`.
    #[arg(long, env = "YOCO_WORKERS", conflicts_with = "cp")]
    workers: Option<usize>,
    /// Context-parallel size: the group is `--tp` × this many local workers.
    #[arg(long, env = "YOCO_CP")]
    cp: Option<usize>,
    /// `--device` of the local workers (see `yoco worker --help`); default: `auto`, which puts
    /// the workers on GPU 0 when there is one (a context-parallel group of several shares it,
    /// with TCP between them).
    #[arg(long, env = "YOCO_WORKER_DEVICE")]
    worker_device: Option<String>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(clap::Args)]
pub struct CoordinatorArgs {
    /// gRPC address of each worker (`yoco worker`), in rank order; repeat or comma-separate.
    /// Without `--etcd`, these are the one static group.
    #[arg(
        long = "worker",
        env = "YOCO_WORKER_ADDRS",
        value_delimiter = ',',
        required_unless_present = "etcd",
        conflicts_with = "etcd"
    )]
    workers: Vec<String>,
    /// etcd endpoints (comma-separated): the worker groups come from membership there, several
    /// groups serve as replicas, and lost ranks take their group out of service.
    #[arg(long, env = "YOCO_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Cluster name: the keys live under `/yoco/<cluster>/`.
    #[arg(long, default_value = "default", env = "YOCO_CLUSTER")]
    cluster: String,
    /// Seconds this coordinator's etcd lease (its group ownership) outlives its last renewal.
    #[arg(long, default_value_t = 10, env = "YOCO_LEASE_TTL")]
    lease_ttl: u64,
    /// Directory with the model's tokenizer.json and tokenizer_config.json (chat template), if
    /// it has them (default: cl100k_base, no chat template).
    #[arg(long, env = "YOCO_TOKENIZER_DIR")]
    tokenizer_dir: Option<PathBuf>,
    /// Model directory the workers should load, as they see it (default: each worker's own
    /// `--model`).
    #[arg(long, env = "YOCO_WORKER_MODEL")]
    worker_model: Option<String>,
    #[command(flatten)]
    worker_tls: WorkerTlsArgs,
    #[command(flatten)]
    server: ServerArgs,
}

/// Where the worker groups come from.
enum Groups {
    /// One group, formed once; if it fails the process exits non-zero.
    Static(Pin<Box<dyn Future<Output = anyhow::Result<WorkerGroup>> + Send>>),
    /// Every group registered in etcd, formed and re-formed as membership changes.
    Etcd(Box<ClusterConfig>),
}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let tp = args.server.tp;
    let workers = match (args.workers, args.cp) {
        (Some(p), _) => p,
        (None, Some(cp)) => cp.saturating_mul(tp),
        (None, None) => 2usize.max(tp),
    };
    if workers == 0 || tp == 0 {
        anyhow::bail!("--workers, --cp and --tp must be at least 1");
    }
    if !workers.is_multiple_of(tp) {
        anyhow::bail!("--tp {tp} must divide the {workers} workers");
    }
    let dir = crate::default_model::resolve(args.model.clone())?;
    // The split is checked here, before any worker starts, so that the error names it.
    ModelConfig::from_file(&dir.join("params.json"))?.check_tp(tp)?;
    let tokenizer = Tokenizer::for_model_dir(&dir)?;
    let chat = ChatTemplate::for_model_dir(&dir)?;
    let mut opts = group_options(&args.server, None);
    opts.local_device = args.worker_device.clone();
    let form = Box::pin(async move { WorkerGroup::spawn_local(workers, &dir, &opts).await });
    runtime()?.block_on(run(args.server, tokenizer, chat, Groups::Static(form)))
}

pub fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let tokenizer = match &args.tokenizer_dir {
        Some(dir) => Tokenizer::for_model_dir(dir)?,
        None => Tokenizer::cl100k(),
    };
    let chat = match &args.tokenizer_dir {
        Some(dir) => ChatTemplate::for_model_dir(dir)?,
        None => None,
    };
    let opts = group_options(&args.server, args.worker_tls.client_config()?);
    let (workers, model) = (args.workers.clone(), args.worker_model.clone());
    let groups = if args.etcd.is_empty() {
        Groups::Static(Box::pin(async move { WorkerGroup::connect(&workers, None, model.as_deref(), &opts).await }))
    } else {
        if args.lease_ttl == 0 || args.lease_ttl > 3600 {
            anyhow::bail!("--lease-ttl must be 1 to 3600 seconds");
        }
        Groups::Etcd(Box::new(ClusterConfig {
            etcd: EtcdConfig { endpoints: args.etcd.clone(), lease_ttl: args.lease_ttl },
            keys: Keys::new(&args.cluster).map_err(|e| anyhow!(e))?,
            id: crate::server::dynamic::coordinator_id(),
            model_dir: model,
            group_options: opts,
            drain_timeout: drain_timeout(&args.server),
        }))
    };
    runtime()?.block_on(run(args.server, tokenizer, chat, groups))
}

fn drain_timeout(a: &ServerArgs) -> Duration {
    Duration::from_secs_f64(a.drain_timeout.clamp(0.0, 86400.0))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

fn group_options(a: &ServerArgs, tls: Option<WorkerTls>) -> GroupOptions {
    GroupOptions {
        tls,
        allow_plaintext: a.tls.allow_plaintext,
        cache_budget_bytes: a.cache_mib << 20,
        cache_dtype: a.cache_dtype,
        weight_dtype: a.weight_dtype,
        collective_timeout: Duration::from_secs_f64(a.collective_timeout.clamp(0.001, 86400.0)),
        transport: a.transport.clone(),
        local_worker_threads: None,
        tp: a.tp.max(1),
        max_sequences: a.max_running,
        local_device: None,
        prefix_disk_dir: a.prefix_disk_dir.as_ref().map(|d| d.display().to_string()),
        compute_dtype: a.compute_dtype,
    }
}

async fn run(args: ServerArgs, tokenizer: Tokenizer, chat: Option<ChatTemplate>, groups: Groups) -> anyhow::Result<()> {
    let config = SchedulerConfig {
        max_batch_tokens: args.max_batch_tokens,
        max_queue: args.max_queue,
        max_running: args.max_running,
        prefill_chunk: args.prefill_chunk,
        prefix: PrefixConfig {
            enabled: !args.no_prefix_cache,
            snapshot_interval: args.prefix_snapshot_interval,
            // The sizes of a block and a state are the group's: `GroupStarter` fills them in.
            disk: args.prefix_disk_dir.as_ref().map(|_| DiskConfig {
                budget_bytes: args.prefix_disk_mib << 20,
                block_bytes: 0,
                state_bytes: 0,
            }),
            memory_bytes: args.prefix_memory_mib.map(|m| m << 20),
            ..PrefixConfig::default()
        },
    };
    config.validate().map_err(|e| anyhow!(e))?;
    // Certificates are read, and plaintext off loopback refused, before anything listens.
    let grpc_tls = args.tls.for_listener(args.listen, "the gRPC API", &[b"h2"])?;
    let http_tls = args.tls.for_listener(args.http_listen, "the HTTP API", &[b"http/1.1"])?;
    let tokenizer = Arc::new(tokenizer);
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let http_listener = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("listening on {}", args.http_listen))?;
    let http_addr = http_listener.local_addr()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_not_serving::<GenerationServer<Api>>().await;
    // Reflection in both versions, as grpc-go serves it: v1 for grpcurl and current tools,
    // v1alpha for grpcio's reflection client (Python's only one), older grpcurl and Postman.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(yoco_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection, reflection_v1alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);
    let keys = ApiKeys::new(args.api_key_file.clone(), std::env::var("YOCO_API_KEYS").ok().as_deref())?;
    if keys.is_some() {
        tracing::info!("API keys required on the public endpoints (health probes excepted)");
    }
    let limits = RequestLimits {
        max_prompt_tokens: (args.max_prompt_tokens > 0).then_some(args.max_prompt_tokens),
        request_timeout: (args.request_timeout > 0.0)
            .then(|| Duration::from_secs_f64(args.request_timeout.min(30.0 * 86400.0))),
        max_streams_per_key: (args.max_streams_per_key > 0).then_some(args.max_streams_per_key),
    };
    if limits.max_streams_per_key.is_some() && keys.is_none() {
        anyhow::bail!("--max-streams-per-key counts streams per API key: give --api-key-file or YOCO_API_KEYS");
    }
    let api = Api::new(tokenizer.clone(), chat)
        .log_prompts(args.log_prompts)
        .request_limits(limits)
        .routing(args.route_policy, args.route_balance_threshold);
    let stop = Arc::new(tokio::sync::Notify::new());
    let http_stop = Arc::new(tokio::sync::Notify::new());
    let http = {
        let stop = http_stop.clone();
        let app = crate::http::routes(api.clone(), keys.clone());
        let stopped = async move { stop.notified().await };
        match http_tls {
            Some(tls) => {
                let listener = crate::net::tls::TlsListener::new(http_listener, tls)?;
                tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stopped).await })
            }
            None => tokio::spawn(async move {
                axum::serve(crate::net::listen::http(http_listener), app).with_graceful_shutdown(stopped).await
            }),
        }
    };
    // A Notify of its own: `notify_one` wakes one waiter, and one shared with the gRPC server
    // left one of the two serving for ever after SIGTERM.
    let health_stop = Arc::new(tokio::sync::Notify::new());
    let health_server = match args.health_listen {
        Some(at) => {
            let l = tokio::net::TcpListener::bind(at).await.with_context(|| format!("listening on {at}"))?;
            let stop = health_stop.clone();
            let health = health.clone();
            let local = l.local_addr()?;
            let task = tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(health)
                    .serve_with_incoming_shutdown(crate::net::listen::grpc(l), async move { stop.notified().await }),
            );
            Some((local, task))
        }
        None => None,
    };
    let server = {
        let stop = stop.clone();
        let service = GenerationServer::new(api.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let guard = crate::api::auth::grpc_interceptor(keys);
        let router = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(InterceptedService::new(reflection, guard.clone()))
            .add_service(InterceptedService::new(reflection_v1alpha, guard.clone()))
            .add_service(InterceptedService::new(service, guard));
        let stopped = async move { stop.notified().await };
        match grpc_tls {
            Some(tls) => tokio::spawn(
                router.serve_with_incoming_shutdown(crate::net::tls::incoming_stream(listener, tls), stopped),
            ),
            None => tokio::spawn(router.serve_with_incoming_shutdown(crate::net::listen::grpc(listener), stopped)),
        }
    };
    // The one line on stdout: where we listen (the port may have been 0).
    let tls = args.tls.tls_cert.is_some();
    println!(
        "{}",
        serde_json::json!({
            "event": "listening",
            "grpc": addr.to_string(),
            "http": http_addr.to_string(),
            "health": health_server.as_ref().map(|(a, _)| a.to_string()),
            "tls": tls,
            "pid": std::process::id(),
        })
    );
    tracing::info!(grpc = %addr, http = %http_addr, "listening; forming the worker groups");
    let starter = GroupStarter::new(tokenizer, config);
    let signal = shutdown::shutdown(false);
    let outcome = match groups {
        Groups::Static(form) => {
            let (scheme, http_scheme) = if tls { ("https", "https") } else { ("http", "http") };
            let urls = (format!("{scheme}://{addr}"), format!("{http_scheme}://{http_addr}"));
            serve_static(&args, form, &starter, &api, &reporter, signal, urls).await
        }
        Groups::Etcd(cfg) => crate::server::dynamic::run(*cfg, starter, &api, reporter.clone(), signal).await,
    };
    // Streams still open get their last messages before the server stops.
    stop.notify_one();
    http_stop.notify_one();
    health_stop.notify_one();
    server.await??;
    http.await??;
    if let Some((_, task)) = health_server {
        task.await??;
    }
    tracing::info!("stopped");
    outcome
}

/// One group for the life of the process: serve until a signal (drain) or its failure (exit
/// non-zero, so that a supervisor restarts us).
#[allow(clippy::too_many_arguments)]
async fn serve_static(
    args: &ServerArgs,
    form: Pin<Box<dyn Future<Output = anyhow::Result<WorkerGroup>> + Send>>,
    starter: &GroupStarter,
    api: &Api,
    reporter: &tonic_health::server::HealthReporter,
    signal: impl Future<Output = ()>,
    (grpc_url, http_url): (String, String),
) -> anyhow::Result<()> {
    tokio::pin!(signal);
    let group = tokio::select! {
        g = form => g.context("forming the worker group")?,
        _ = &mut signal => {
            tracing::info!("shut down while the group was forming");
            return Ok(());
        }
    };
    let (ready, mut task) = starter.start("local", group)?;
    let scheduler = api.router().insert(ready).scheduler.clone();
    reporter.set_serving::<GenerationServer<Api>>().await;
    eprintln!(
        "serving on {grpc_url} (gRPC) and {http_url} (HTTP); try:\n  yoco client --addr {grpc_url} generate --prompt \"Hello\"\n  curl {http_url}/v1/completions -H 'Content-Type: application/json' -d '{{\"prompt\": \"Hello\", \"max_tokens\": 16}}'"
    );
    tokio::select! {
        _ = &mut signal => {
            tracing::info!(timeout_seconds = args.drain_timeout, "draining");
            reporter.set_not_serving::<GenerationServer<Api>>().await;
            scheduler.drain(drain_timeout(args));
            (&mut task).await?;
            Ok(())
        }
        r = &mut task => {
            reporter.set_not_serving::<GenerationServer<Api>>().await;
            r?;
            Err(anyhow!("the worker group failed; every request on it ended with an error"))
        }
    }
}
