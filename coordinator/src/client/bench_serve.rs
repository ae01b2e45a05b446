//! `yoco client bench-serve`: a concurrency sweep against a running server, the way load
//! generators measure serving stacks. At each level, that many streams each send one request
//! after another (a fresh ~600-token prompt each time, so the prefix cache never helps) for a
//! fixed time; the level reports output tokens/s, prompt tokens/s and the percentiles of time to
//! first token and inter-token latency. Throughput should grow, or hold, as streams are added
//! until the machine is saturated.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio_stream::StreamExt;
use yoco_proto::v1 as pb;

use super::connect::Client;
use super::workload::{request, tokens};

#[derive(clap::Args)]
pub struct Args {
    /// Concurrent streams of each level, run one level after another.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    streams: Vec<usize>,
    /// Tokens of each prompt (random ids, new for every request).
    #[arg(long, default_value_t = 600)]
    prompt_tokens: usize,
    /// Tokens generated per request (end-of-text ignored).
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Seconds each level runs; requests still running at its end are cancelled, and the
    /// tokens they received count.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Print one JSON object per level instead of a table.
    #[arg(long)]
    json: bool,
}

/// What one request saw before the level ended.
#[derive(Default)]
struct Seen {
    ttft: Option<f64>,
    /// Seconds between consecutive tokens (a chunk of n tokens counts n gaps of 1/n each).
    gaps: Vec<f64>,
    tokens: usize,
    prompt: usize,
    finished: bool,
}

/// One stream: requests one after another until `end`.
async fn stream(mut client: Client, salt: usize, vocab: usize, args: (usize, u32), end: Instant) -> Vec<Seen> {
    let (prompt_tokens, max_tokens) = args;
    let mut out = Vec::new();
    for n in 0.. {
        if Instant::now() >= end {
            break;
        }
        let req = request(tokens(prompt_tokens, salt * 1_000_003 + n, vocab), max_tokens);
        let started = Instant::now();
        let mut seen = Seen { prompt: prompt_tokens, ..Seen::default() };
        let Ok(Ok(response)) = tokio::time::timeout_at(end.into(), client.generate(req)).await else {
            break;
        };
        let mut events = response.into_inner();
        let mut last = None;
        while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(end.into(), events.next()).await {
            match msg.event {
                Some(pb::generate_response::Event::Tokens(c)) if !c.tokens.is_empty() => {
                    let now = Instant::now();
                    match last {
                        None => seen.ttft = Some(now.duration_since(started).as_secs_f64()),
                        Some(t) => {
                            let gap = now.duration_since(t).as_secs_f64() / c.tokens.len() as f64;
                            seen.gaps.extend(std::iter::repeat_n(gap, c.tokens.len()));
                        }
                    }
                    last = Some(now);
                    seen.tokens += c.tokens.len();
                }
                Some(pb::generate_response::Event::Finished(_)) => seen.finished = true,
                _ => {}
            }
        }
        out.push(seen);
    }
    out
}

/// The `q` quantile of `v` (nearest rank), in milliseconds.
fn quantile_ms(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i] * 1e3
}

pub async fn run(client: &mut Client, args: Args) -> anyhow::Result<()> {
    let info = client.model_info(pb::ModelInfoRequest {}).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    let info = info.into_inner();
    let vocab = info.vocab_size as usize;
    anyhow::ensure!(args.seconds > 0.0 && args.seconds.is_finite(), "--seconds must be positive");
    anyhow::ensure!(args.streams.iter().all(|&s| s > 0), "--streams: every level needs at least one stream");
    if !args.json {
        println!(
            "bench-serve: {} ({} ranks), prompts of {} tokens, {} tokens generated each, {} s per level",
            info.model, info.world, args.prompt_tokens, args.max_tokens, args.seconds
        );
        println!(
            "{:>7} {:>9} {:>10} {:>10} {:>26} {:>26}",
            "streams", "requests", "out tok/s", "in tok/s", "TTFT ms p50/p90/p99", "ITL ms p50/p90/p99"
        );
    }
    for (level, &streams) in args.streams.iter().enumerate() {
        let started = Instant::now();
        let end = started + Duration::from_secs_f64(args.seconds);
        let mut tasks = tokio::task::JoinSet::new();
        for s in 0..streams {
            let shape = (args.prompt_tokens, args.max_tokens);
            tasks.spawn(stream(client.clone(), level * 10_000 + s, vocab, shape, end));
        }
        let mut seen = Vec::new();
        while let Some(r) = tasks.join_next().await {
            seen.extend(r.context("a stream task failed")?);
        }
        let secs = started.elapsed().as_secs_f64();
        let tokens: usize = seen.iter().map(|s| s.tokens).sum();
        // Prompt tokens of the requests whose first token came within the level.
        let prompt: usize = seen.iter().filter(|s| s.ttft.is_some()).map(|s| s.prompt).sum();
        let finished = seen.iter().filter(|s| s.finished).count();
        let mut ttft: Vec<f64> = seen.iter().filter_map(|s| s.ttft).collect();
        let mut itl: Vec<f64> = seen.iter().flat_map(|s| s.gaps.iter().copied()).collect();
        let (out_rate, in_rate) = (tokens as f64 / secs, prompt as f64 / secs);
        let t = [0.5, 0.9, 0.99].map(|q| quantile_ms(&mut ttft, q));
        let i = [0.5, 0.9, 0.99].map(|q| quantile_ms(&mut itl, q));
        if args.json {
            println!(
                "{}",
                json!({"streams": streams, "seconds": secs, "requests_finished": finished,
                       "output_tokens_per_second": out_rate, "prompt_tokens_per_second": in_rate,
                       "ttft_ms": {"p50": t[0], "p90": t[1], "p99": t[2]},
                       "itl_ms": {"p50": i[0], "p90": i[1], "p99": i[2]}})
            );
        } else {
            let ttft = format!("{:.0}/{:.0}/{:.0}", t[0], t[1], t[2]);
            let itl = format!("{:.1}/{:.1}/{:.1}", i[0], i[1], i[2]);
            println!("{streams:>7} {finished:>9} {out_rate:>10.0} {in_rate:>10.0} {ttft:>26} {itl:>26}");
        }
    }
    Ok(())
}
