//! `yoco client`: calls a running server's public API. `generate` streams text to stdout as it
//! comes (prefill progress and a summary on stderr), or prints one JSON object with `--json`.

pub mod bench_prefix;
pub mod bench_serve;
pub mod connect;
pub mod workload;

use std::io::{IsTerminal, Write};

use anyhow::{bail, Context};
use serde_json::json;
use tokio_stream::StreamExt;
use yoco_proto::v1 as pb;

use self::connect::Client;

#[derive(clap::Args)]
pub struct Args {
    /// Server address: `http://` for plaintext, `https://` for TLS.
    #[arg(long, default_value = "http://127.0.0.1:50051", env = "YOCO_ADDR", global = true)]
    addr: String,
    /// PEM CA certificates to verify an `https://` server with (default: the Web PKI roots).
    #[arg(long, env = "YOCO_TLS_CA", global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate, for servers that require one (mutual TLS); with --tls-key.
    #[arg(long, env = "YOCO_TLS_CERT", global = true, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "YOCO_TLS_KEY", global = true, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// API key, sent as `authorization: Bearer <key>` (a server with keys needs one).
    #[arg(long, env = "YOCO_API_KEY", global = true, hide_env_values = true)]
    api_key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Generate text, streaming it as it comes.
    Generate(Box<GenerateArgs>),
    /// Print the token ids of a text.
    Tokenize { text: String },
    /// Print the model, tokenizer, worker group and cache of the server (JSON).
    Info,
    /// Drop every cached prompt prefix (JSON: snapshots dropped now, and still in use).
    FlushPrefixCache,
    /// Benchmark: one long document, then questions about it (time to first token of each).
    BenchPrefix(bench_prefix::Args),
    /// Benchmark: concurrent streams of short requests (output tokens/s, TTFT and ITL).
    BenchServe(bench_serve::Args),
}

#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
struct GenerateArgs {
    #[command(flatten)]
    input: crate::cli::prompt_args::PromptArgs,
    #[arg(long)]
    max_tokens: Option<u32>,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    repetition_penalty: Option<f32>,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Stop at this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    #[arg(long, value_delimiter = ',')]
    stop_token_ids: Vec<u32>,
    #[arg(long)]
    ignore_eos: bool,
    /// Alternatives per generated token.
    #[arg(long, default_value_t = 0)]
    logprobs: u32,
    #[arg(long)]
    prompt_logprobs: bool,
    #[arg(long, default_value = "")]
    request_id: String,
    /// Give up (and cancel the request) after this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let channel = endpoint(&args)?.connect().await.with_context(|| format!("connecting to {}", args.addr))?;
        let mut client = connect::client(channel, args.api_key.as_deref())?;
        match args.command {
            Command::Tokenize { text } => {
                let ids = client.tokenize(pb::TokenizeRequest { text }).await.map_err(status)?.into_inner().ids;
                println!("{}", serde_json::to_string(&ids)?);
            }
            Command::Info => {
                let info = client.model_info(pb::ModelInfoRequest {}).await.map_err(status)?.into_inner();
                println!("{}", serde_json::to_string_pretty(&info_json(&info))?);
            }
            Command::FlushPrefixCache => {
                let r = client.flush_prefix_cache(pb::FlushPrefixCacheRequest {}).await.map_err(status)?.into_inner();
                println!("{}", json!({"dropped": r.dropped, "in_use": r.in_use}));
            }
            Command::BenchPrefix(b) => bench_prefix::run(&mut client, b).await?,
            Command::BenchServe(b) => bench_serve::run(&mut client, b).await?,
            Command::Generate(g) => generate(&mut client, *g).await?,
        }
        Ok(())
    })
}

/// The server's endpoint, with TLS for `https://` addresses.
fn endpoint(args: &Args) -> anyhow::Result<tonic::transport::Endpoint> {
    let endpoint = tonic::transport::Endpoint::from_shared(args.addr.clone())?;
    if !args.addr.starts_with("https://") {
        if args.tls_ca.is_some() || args.tls_cert.is_some() {
            bail!("--tls-ca and --tls-cert need an https:// --addr");
        }
        return Ok(endpoint);
    }
    let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut tls = tonic::transport::ClientTlsConfig::new();
    tls = match &args.tls_ca {
        Some(ca) => tls.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?)),
        None => tls.with_webpki_roots(),
    };
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        tls = tls.identity(tonic::transport::Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(endpoint.tls_config(tls)?)
}

fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

fn info_json(i: &pb::ModelInfoResponse) -> serde_json::Value {
    json!({
        "model": i.model,
        "config": serde_json::from_str::<serde_json::Value>(&i.config_json).unwrap_or_default(),
        "vocab_size": i.vocab_size,
        "tokenizer": i.tokenizer,
        "eos_token_id": i.eos_token_id,
        "world": i.world,
        "tp": i.tp,
        "cp": i.cp,
        "transport": i.transport,
        "ranks": i.ranks.iter().map(|r| json!({
            "rank": r.rank, "address": r.address, "cache_capacity_tokens": r.cache_capacity_tokens,
            "cache_used_bytes": r.cache_used_bytes, "sequences": r.sequences, "weight_bytes": r.weight_bytes,
            "device": r.device,
        })).collect::<Vec<_>>(),
        "cache_bytes_per_token": i.cache_bytes_per_token,
        "cache_capacity_tokens": i.cache_capacity_tokens,
        "max_request_tokens": i.max_request_tokens,
        "max_batch_tokens": i.max_batch_tokens,
        "max_queue": i.max_queue,
        "max_running": i.max_running,
        "running": i.running,
        "waiting": i.waiting,
        "prefix_cache": i.prefix_cache,
        "prefix_cache_snapshots": i.prefix_cache_snapshots,
        "prefix_cache_blocks": i.prefix_cache_blocks,
        "prefix_disk_snapshots": i.prefix_disk_snapshots,
        "prefix_disk_bytes": i.prefix_disk_bytes,
        "groups": i.groups.iter().map(|g| json!({
            "name": g.name, "world": g.world, "accepting": g.accepting, "running": g.running,
            "waiting": g.waiting, "routed": g.routed, "addresses": g.addresses,
        })).collect::<Vec<_>>(),
    })
}

async fn generate(client: &mut Client, g: GenerateArgs) -> anyhow::Result<()> {
    let prompt = g.input.read()?;
    let req = pb::GenerateRequest {
        prompt: Some(prompt),
        max_tokens: g.max_tokens,
        sampling: Some(pb::SamplingParams {
            temperature: g.temperature,
            top_p: g.top_p,
            top_k: g.top_k,
            min_p: g.min_p,
            seed: g.seed,
            repetition_penalty: g.repetition_penalty,
            presence_penalty: g.presence_penalty,
            frequency_penalty: g.frequency_penalty,
        }),
        stop: g.stop,
        stop_token_ids: g.stop_token_ids,
        ignore_eos: g.ignore_eos,
        logprobs: g.logprobs,
        prompt_logprobs: g.prompt_logprobs,
        request_id: g.request_id,
    };
    let mut request = tonic::Request::new(req);
    if let Some(t) = g.timeout {
        request.set_timeout(std::time::Duration::from_secs_f64(t.max(0.001)));
    }
    let mut stream = client.generate(request).await.map_err(status)?.into_inner();
    let tty = std::io::stderr().is_terminal();
    let (mut text, mut tokens, mut logprobs, mut top) = (String::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut prompt_logprobs, mut finished, mut request_id) = (None, None, String::new());
    let mut stdout = std::io::stdout();
    let mut progress_shown = false;
    while let Some(msg) = stream.next().await {
        let msg = match msg {
            Ok(m) => m,
            // The final message (with its error) came first; the status repeats it.
            Err(s) if finished.is_some() => {
                tracing::debug!(code = ?s.code(), "stream ended with an error status");
                break;
            }
            Err(s) => return Err(status(s)),
        };
        request_id = msg.request_id;
        match msg.event {
            Some(pb::generate_response::Event::Progress(p)) if !g.json => {
                let rate = p.prefilled_tokens as f64 / p.elapsed_seconds.max(1e-9);
                let frac = p.prefilled_tokens as f64 / p.prompt_tokens.max(1) as f64;
                let eta = (p.prompt_tokens - p.prefilled_tokens.min(p.prompt_tokens)) as f64 / rate.max(1e-9);
                let bar: String = (0..30).map(|i| if (i as f64) < frac * 30.0 { '#' } else { '.' }).collect();
                let line = format!(
                    "prefill [{bar}] {}/{} tokens ({:.0}%), {:.0} tok/s, ETA {:.0}s",
                    p.prefilled_tokens,
                    p.prompt_tokens,
                    100.0 * frac,
                    rate,
                    eta
                );
                progress_shown = true;
                if tty {
                    eprint!("\r{line}\x1b[K");
                } else {
                    eprintln!("{line}");
                }
            }
            Some(pb::generate_response::Event::Progress(_)) => {}
            Some(pb::generate_response::Event::PromptLogprobs(p)) => prompt_logprobs = Some(p.logprobs),
            Some(pb::generate_response::Event::Tokens(chunk)) => {
                if std::mem::take(&mut progress_shown) && tty {
                    eprintln!();
                }
                if !g.json {
                    print!("{}", chunk.text);
                    stdout.flush()?;
                }
                text.push_str(&chunk.text);
                for t in chunk.tokens {
                    tokens.push(t.id);
                    logprobs.push(t.logprob);
                    top.push(
                        t.top_logprobs
                            .iter()
                            .map(|a| json!({"token": a.token_id, "logprob": a.logprob}))
                            .collect::<Vec<_>>(),
                    );
                }
            }
            Some(pb::generate_response::Event::Finished(f)) => finished = Some(f),
            None => {}
        }
    }
    let f = finished.context("the stream ended without a final message")?;
    let reason = pb::FinishReason::try_from(f.reason).unwrap_or_default();
    let reason_name = match reason {
        pb::FinishReason::Length => "length",
        pb::FinishReason::Stop => "stop",
        pb::FinishReason::Cancelled => "cancelled",
        pb::FinishReason::Error => "error",
        pb::FinishReason::Unspecified => "unspecified",
    };
    let usage = f.usage.unwrap_or_default();
    let timing = f.timing.unwrap_or_default();
    if g.json {
        let out = json!({
            "request_id": request_id,
            "tokens": tokens,
            "text": text,
            "logprobs": logprobs,
            "top_logprobs": if g.logprobs > 0 { json!(top) } else { serde_json::Value::Null },
            "prompt_logprobs": prompt_logprobs,
            "finish_reason": reason_name,
            "stop": match &f.matched {
                Some(pb::finished::Matched::StopString(s)) => json!(s),
                Some(pb::finished::Matched::StopTokenId(t)) => json!(t),
                None => serde_json::Value::Null,
            },
            "error": f.error,
            "seed": f.seed,
            "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                      "cached_prompt_tokens": usage.cached_prompt_tokens},
            "timing": {
                "queue_seconds": timing.queue_seconds,
                "time_to_first_token_seconds": timing.time_to_first_token_seconds,
                "prefill_tokens_per_second": timing.prefill_tokens_per_second,
                "decode_tokens_per_second": timing.decode_tokens_per_second,
                "total_seconds": timing.total_seconds,
            },
        });
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens ({} cached), {} generated ({reason_name}); TTFT {:.3}s, prefill {:.0} tok/s, decode {:.1} tok/s]",
            usage.prompt_tokens,
            usage.cached_prompt_tokens,
            usage.completion_tokens,
            timing.time_to_first_token_seconds,
            timing.prefill_tokens_per_second,
            timing.decode_tokens_per_second
        );
    }
    if reason == pb::FinishReason::Error {
        bail!("the request failed: {}", f.error);
    }
    Ok(())
}
