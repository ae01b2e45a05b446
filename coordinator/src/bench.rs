//! `yoco bench`: prefill and decode speed of the engine on a preset, beside the machine's
//! measured ceilings (f32 GEMM rate, memory bandwidth) in the same run: prefill as a fraction of
//! the GEMM peak, decode as a fraction of the bandwidth (weights plus the global cache read per
//! token), batched decode, and cache bytes per token.

use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use serde_json::json;
use yoco_worker::config::{ModelConfig, SelfMixerKind};
use yoco_worker::engine::{Engine, EngineOptions, Logits, StepItem};
use yoco_worker::kernels::matmul::matmul_t;
use yoco_worker::kernels::retention::RETENTION_BLOCK;
use yoco_worker::model::Model;
use yoco_worker::presets::{write_random_model, Preset, StoreDtype};
use yoco_worker::sampling::argmax;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Prompt lengths to prefill, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4096,32768,131072")]
    lengths: Vec<usize>,
    /// Tokens decoded after each prefill.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    #[arg(long, default_value_t = 4096)]
    prefill_chunk: usize,
    /// Concurrent sequences for the batched decode runs (0: none).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
    /// Context of each sequence in the batched decode runs.
    #[arg(long, default_value_t = 4096)]
    batch_context: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let Some(preset) = Preset::parse(&args.preset) else {
        bail!("unknown preset `{}`", args.preset);
    };
    let cfg = preset.config();
    let dir = tempfile_dir()?;
    write_random_model(&cfg, StoreDtype::F32, 0, false, &dir)?;
    let model = Arc::new(Model::load(&dir)?);
    let threads = rayon::current_num_threads();
    let peak = gemm_gflops(2048);
    let bandwidth = read_gbps(1 << 30);
    let flops_per_token = prefill_flops_per_token(&cfg);
    let cache_bytes_per_token = cfg.cache_numbers_per_token() * 4;
    // What one decode token reads: every weight but the embedding table (one row of it), and
    // the global cache once per cross-decoder layer.
    let weight_bytes = (cfg.n_params(false) - cfg.vocab_size * cfg.dim) * 4;
    let read_per_token =
        |context: usize| (weight_bytes + cfg.n_cross_layers() * context * cache_bytes_per_token) as f64;
    if !args.json {
        println!("yoco bench: preset {} ({} params), {threads} threads", args.preset, cfg.n_params(false));
        println!("machine: f32 GEMM 2048³ = {peak:.1} GFLOP/s; memory read (1 GiB) = {bandwidth:.1} GB/s");
        println!("global cache: {cache_bytes_per_token} bytes/token (f32); weights streamed per decode token: {weight_bytes} bytes");
        println!(
            "{:>9} {:>10} {:>12} {:>10} {:>8} {:>12} {:>10} {:>7}",
            "context", "prefill s", "prefill tok/s", "GFLOP/s", "of peak", "decode tok/s", "read GB/s", "of bw"
        );
    }
    let mut rows = Vec::new();
    for &n in &args.lengths {
        let opts = EngineOptions {
            cache_budget_bytes: (n + args.decode_tokens + 512) * cache_bytes_per_token * 2,
            ..Default::default()
        };
        let mut engine = Engine::new(model.clone(), &opts);
        engine.add_sequence(1)?;
        let prompt: Vec<u32> = (0..n).map(|i| ((i * 7919) % 50000) as u32).collect();
        let started = Instant::now();
        let mut last = Vec::new();
        for (i, part) in prompt.chunks(args.prefill_chunk).enumerate() {
            let is_last = (i + 1) * args.prefill_chunk >= n;
            let want = if is_last { Logits::Last } else { Logits::None };
            last = engine.step(&[StepItem::prefill(1, part, want)])?.remove(0).logits;
        }
        let prefill = started.elapsed().as_secs_f64();
        let started = Instant::now();
        for _ in 0..args.decode_tokens {
            let token = argmax(&last);
            last = engine.step(&[StepItem::decode(1, &[token])])?.remove(0).logits;
        }
        let decode = args.decode_tokens as f64 / started.elapsed().as_secs_f64();
        let gflops = flops_per_token * n as f64 / prefill / 1e9;
        let read_gbps = read_per_token(n + args.decode_tokens / 2) * decode / 1e9;
        let row = json!({
            "context": n, "prefill_seconds": prefill, "prefill_tokens_per_second": n as f64 / prefill,
            "prefill_gflops": gflops, "prefill_fraction_of_gemm_peak": gflops / peak,
            "decode_tokens_per_second": decode, "decode_read_gbps": read_gbps,
            "decode_fraction_of_bandwidth": read_gbps / bandwidth,
            "cache_bytes": engine.sequence_cache_bytes(1),
        });
        if !args.json {
            println!(
                "{n:>9} {prefill:>10.2} {:>12.0} {gflops:>10.1} {:>7.0}% {decode:>12.1} {read_gbps:>10.1} {:>6.0}%",
                n as f64 / prefill,
                100.0 * gflops / peak,
                100.0 * read_gbps / bandwidth
            );
        }
        rows.push(row);
    }
    let batched = batched_decode(&model, &args, cache_bytes_per_token)?;
    if !args.json && !batched.is_empty() {
        println!("batched decode at {} tokens of context each:", args.batch_context);
        println!("{:>9} {:>12} {:>12}", "sequences", "tokens/s", "vs one");
        let one = batched.first().map_or(1.0, |b| b.1);
        for (b, rate) in &batched {
            println!("{b:>9} {rate:>12.1} {:>11.1}x", rate / one);
        }
    }
    if args.json {
        let out = json!({
            "preset": args.preset, "threads": threads, "gemm_gflops_2048": peak, "read_gbps": bandwidth,
            "cache_bytes_per_token": cache_bytes_per_token, "decode_weight_bytes": weight_bytes,
            "prefill_flops_per_token": flops_per_token, "runs": rows,
            "batched_decode": batched.iter().map(|(b, r)| json!({
                "sequences": b, "context": args.batch_context, "tokens_per_second": r,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("yoco-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Decode tokens/s with `b` sequences of `batch_context` tokens each stepping together, for
/// each `b` of `--batches`.
fn batched_decode(model: &Arc<Model>, args: &Args, cache_bytes_per_token: usize) -> anyhow::Result<Vec<(usize, f64)>> {
    let mut out = Vec::new();
    let steps = args.decode_tokens.max(4);
    for &b in args.batches.iter().filter(|&&b| b > 0) {
        let opts = EngineOptions {
            cache_budget_bytes: b * (args.batch_context + steps + 512) * cache_bytes_per_token * 2,
            ..Default::default()
        };
        let mut engine = Engine::new(model.clone(), &opts);
        let mut last = Vec::new();
        for s in 0..b as u64 {
            engine.add_sequence(s)?;
            let prompt: Vec<u32> =
                (0..args.batch_context).map(|i| ((i * 7919 + s as usize * 13) % 50000) as u32).collect();
            for (i, part) in prompt.chunks(args.prefill_chunk).enumerate() {
                let want = if (i + 1) * args.prefill_chunk >= prompt.len() { Logits::Last } else { Logits::None };
                let logits = engine.step(&[StepItem::prefill(s, part, want)])?.remove(0).logits;
                if want == Logits::Last {
                    last.push(argmax(&logits));
                }
            }
        }
        let started = Instant::now();
        for _ in 0..steps {
            let tokens: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
            let items: Vec<StepItem> = tokens.iter().enumerate().map(|(s, t)| StepItem::decode(s as u64, t)).collect();
            let outs = engine.step(&items)?;
            last = outs.iter().map(|o| argmax(&o.logits)).collect();
        }
        out.push((b, (b * steps) as f64 / started.elapsed().as_secs_f64()));
    }
    Ok(out)
}

/// The best of three parallel reads (sums) of `bytes` with every thread, in GB/s: the ceiling of
/// a memory-bound decode, which streams weights and cache and writes next to nothing.
fn read_gbps(bytes: usize) -> f64 {
    use rayon::prelude::*;
    let n = bytes / 4;
    let src: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    let chunk = n.div_ceil(rayon::current_num_threads().max(1) * 4);
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let total: f32 = src
            .par_chunks(chunk)
            .map(|c| {
                // Sixteen running sums, so the loop vectorises.
                let acc = c.chunks_exact(16).fold([0f32; 16], |mut acc, x| {
                    for (a, v) in acc.iter_mut().zip(x) {
                        *a += v;
                    }
                    acc
                });
                acc.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(total);
        best = best.max((n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// The best of three `n³` f32 products through the engine's GEMM path, in GFLOP/s.
fn gemm_gflops(n: usize) -> f64 {
    let a: Vec<f32> = (0..n * n).map(|i| (i % 13) as f32 * 0.01).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.01).collect();
    let mut c = vec![0f32; n * n];
    (0..3)
        .map(|_| {
            let t = Instant::now();
            matmul_t(&a, n, n, &b, n, &mut c);
            2.0 * (n as f64).powi(3) / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// Model FLOPs per prompt token of a prefill with early exit: the self-decoder's projections,
/// FFNs and mixers plus the KV projection (the cross-decoder runs for one token only).
fn prefill_flops_per_token(cfg: &ModelConfig) -> f64 {
    let (d, h) = (cfg.dim as f64, cfg.hidden_dim as f64);
    let hd = cfg.self_head_dim() as f64;
    let heads = cfg.n_self_heads as f64;
    let (proj, mixer) = match cfg.mixer {
        // q,k,v,g,out + gt; per head: q·S and the state update (2·d² each, ×2 for mul+add),
        // and the in-block causal scores and sums (≈ block/2 keys × d × 2 × 2).
        SelfMixerKind::GatedRetention => {
            (5.0 * d * d + d * heads, heads * (4.0 * hd * hd + 2.0 * RETENTION_BLOCK as f64 * hd))
        }
        SelfMixerKind::SlidingWindow { window } => (4.0 * d * d, heads * 4.0 * window as f64 * hd),
    };
    let per_layer = 2.0 * (proj + 3.0 * d * h) + mixer;
    cfg.n_self_layers() as f64 * per_layer + 2.0 * 2.0 * d * cfg.kv_dim() as f64
}
