//! `yoco client bench-prefix`: the prefix cache's workload against a running server. One long
//! document, then questions about it, one after another: time to first token of each request,
//! the prompt tokens the cache served, and the speed-up of the later requests over the first. Run it against a server with
//! the cache and one with `--no-prefix-cache` to compare. `--groups N` checks that the server
//! routes over N worker groups and says which group served each question (with
//! `--route-policy cache-aware` all but the first go where the document is cached; with
//! `least-loaded` they spread). `scripts/bench-prefix-groups.sh` runs the comparison.

use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::json;
use tokio_stream::StreamExt;
use yoco_proto::v1 as pb;

use super::connect::Client;
use super::workload::{request, tokens};

#[derive(clap::Args)]
pub struct Args {
    /// Tokens of the shared document.
    #[arg(long, default_value_t = 262_144)]
    doc_tokens: usize,
    /// Questions asked after it (each a different suffix).
    #[arg(long, default_value_t = 10)]
    questions: usize,
    /// Tokens of each question.
    #[arg(long, default_value_t = 32)]
    question_tokens: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 4)]
    max_tokens: u32,
    /// The worker groups the server must route over (0: any); the table says which served
    /// each question.
    #[arg(long, default_value_t = 0)]
    groups: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

struct Measured {
    ttft: f64,
    cached: u64,
    prompt: u64,
    /// The group that served it.
    group: String,
}

async fn info(client: &mut Client) -> anyhow::Result<pb::ModelInfoResponse> {
    Ok(client.model_info(pb::ModelInfoRequest {}).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?.into_inner())
}

/// Requests routed to each group so far.
fn routed(info: &pb::ModelInfoResponse) -> Vec<(String, u64)> {
    info.groups.iter().map(|g| (g.name.clone(), g.routed)).collect()
}

async fn one(client: &mut Client, ids: Vec<u32>, max_tokens: u32) -> anyhow::Result<Measured> {
    let req = request(ids, max_tokens);
    let started = Instant::now();
    let mut stream = client.generate(req).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?.into_inner();
    let mut ttft = None;
    let mut finished = None;
    while let Some(msg) = stream.next().await {
        match msg.map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?.event {
            Some(pb::generate_response::Event::Tokens(_)) => {
                ttft.get_or_insert(started.elapsed().as_secs_f64());
            }
            Some(pb::generate_response::Event::Finished(f)) => finished = Some(f),
            _ => {}
        }
    }
    let f = finished.context("the stream ended without a final message")?;
    if !f.error.is_empty() {
        bail!("the request failed: {}", f.error);
    }
    let usage = f.usage.unwrap_or_default();
    Ok(Measured {
        ttft: ttft.context("no token came")?,
        cached: usage.cached_prompt_tokens,
        prompt: usage.prompt_tokens,
        group: String::new(),
    })
}

pub async fn run(client: &mut Client, args: Args) -> anyhow::Result<()> {
    let info = info(client).await?;
    if args.groups > 0 && info.groups.len() != args.groups {
        bail!("--groups {}: the server routes over {} group(s)", args.groups, info.groups.len());
    }
    let vocab = info.vocab_size as usize;
    let doc = tokens(args.doc_tokens, 0, vocab);
    let mut rows = Vec::new();
    if !args.json {
        println!(
            "bench-prefix: {}-token document, {} questions of {} tokens; {} group(s) of {} ranks, prefix cache {}{}",
            args.doc_tokens,
            args.questions,
            args.question_tokens,
            info.groups.len().max(1),
            info.world,
            if info.prefix_cache { "on" } else { "off" },
            if info.prefix_disk_bytes > 0 || info.prefix_disk_snapshots > 0 { " with a disk tier" } else { "" }
        );
        println!("{:>8} {:>8} {:>12} {:>14} {:>12}", "request", "group", "TTFT s", "cached tokens", "prompt tok/s");
    }
    for q in 0..args.questions {
        let mut ids = doc.clone();
        ids.extend(tokens(args.question_tokens, q + 1, vocab));
        let before = routed(&self::info(client).await?);
        let mut m = one(client, ids, args.max_tokens).await?;
        let after = routed(&self::info(client).await?);
        m.group = after
            .iter()
            .find(|(name, n)| before.iter().find(|(b, _)| b == name).map_or(*n > 0, |(_, m)| n > m))
            .map_or_else(|| "?".into(), |(name, _)| name.clone());
        let rate = m.prompt as f64 / m.ttft;
        if !args.json {
            println!("{:>8} {:>8} {:>12.3} {:>14} {:>12.0}", q + 1, m.group, m.ttft, m.cached, rate);
        }
        rows.push(m);
    }
    let first = rows.first().map_or(0.0, |r| r.ttft);
    let later: Vec<f64> = rows.iter().skip(1).map(|r| r.ttft).collect();
    let later_mean = later.iter().sum::<f64>() / later.len().max(1) as f64;
    let mut sorted = later.clone();
    sorted.sort_by(f64::total_cmp);
    let later_median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    if args.json {
        let out = json!({
            "doc_tokens": args.doc_tokens, "questions": args.questions, "world": info.world,
            "groups": info.groups.len(), "prefix_cache": info.prefix_cache,
            "ttft_seconds": rows.iter().map(|r| r.ttft).collect::<Vec<_>>(),
            "cached_tokens": rows.iter().map(|r| r.cached).collect::<Vec<_>>(),
            "served_by": rows.iter().map(|r| r.group.clone()).collect::<Vec<_>>(),
            "first_ttft_seconds": first, "later_mean_ttft_seconds": later_mean,
            "later_median_ttft_seconds": later_median,
        });
        println!("{out}");
    } else {
        println!(
            "first TTFT {first:.3}s; later requests {later_mean:.3}s on average, median {later_median:.3}s ({:.1}x faster)",
            first / later_mean.max(1e-9)
        );
    }
    Ok(())
}
