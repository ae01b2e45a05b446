//! `yoco bench`: prefill and decode speed of the engine on a preset, beside the machine's
//! measured GEMM peak, with cache bytes per token.

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
    let flops_per_token = prefill_flops_per_token(&cfg);
    let cache_bytes_per_token = cfg.cache_numbers_per_token() * 4;
    if !args.json {
        println!("yoco bench: preset {} ({} params), {threads} threads", args.preset, cfg.n_params(false));
        println!("machine: f32 GEMM 2048³ = {peak:.1} GFLOP/s");
        println!("global cache: {cache_bytes_per_token} bytes/token (f32)");
        println!(
            "{:>9} {:>10} {:>12} {:>10} {:>8} {:>12}",
            "context", "prefill s", "prefill tok/s", "GFLOP/s", "of peak", "decode tok/s"
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
        let row = json!({
            "context": n, "prefill_seconds": prefill, "prefill_tokens_per_second": n as f64 / prefill,
            "prefill_gflops": gflops, "prefill_fraction_of_gemm_peak": gflops / peak,
            "decode_tokens_per_second": decode,
            "cache_bytes": engine.sequence_cache_bytes(1),
        });
        if !args.json {
            println!(
                "{n:>9} {prefill:>10.2} {:>12.0} {gflops:>10.1} {:>7.0}% {decode:>12.1}",
                n as f64 / prefill,
                100.0 * gflops / peak
            );
        }
        rows.push(row);
    }
    if args.json {
        let out = json!({
            "preset": args.preset, "threads": threads, "gemm_gflops_2048": peak,
            "cache_bytes_per_token": cache_bytes_per_token,
            "prefill_flops_per_token": flops_per_token, "runs": rows,
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
