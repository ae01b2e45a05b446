//! `yoco bench`: prefill and decode speed of the engine on a preset, beside the machine's
//! measured ceilings (f32 GEMM rate, memory bandwidth) in the same run: prefill as a fraction of
//! the GEMM peak, decode as a fraction of the bandwidth (weights plus the global cache read per
//! token), batched decode, and cache bytes per token.

use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use serde_json::json;
use yoco_worker::ceilings::{gemm_gflops, read_gbps};
use yoco_worker::config::{ModelConfig, SelfMixerKind};
use yoco_worker::executor::Executor;
use yoco_worker::generate::{PlanRunner, RunError};
use yoco_worker::plan::{DecodeWork, Plan, PrefillWork, SeqResult, SeqSpec};

use crate::cluster::group::CollectiveTotals;
use yoco_worker::engine::{Engine, EngineOptions, Logits, StepItem};
use yoco_worker::kernels::kv_block::CacheDtype;
use yoco_worker::kernels::retention::RETENTION_BLOCK;
use yoco_worker::model::Model;
use yoco_worker::presets::{write_random_model, Preset, StoreDtype};
use yoco_worker::sampling::{argmax, log_softmax};
use yoco_worker::weights::{ComputeDtype, WeightDtype};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Prompt lengths to prefill, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4096,16384,32768,131072")]
    lengths: Vec<usize>,
    /// Tokens decoded after each prefill.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Rounds of `--decode-tokens` after each prefill of the main table, each between two
    /// bandwidth measurements; the fastest round is reported (a shared machine's slow spells
    /// then fall on one round, not the figure).
    #[arg(long, default_value_t = 3)]
    decode_rounds: usize,
    #[arg(long, default_value_t = 4096)]
    prefill_chunk: usize,
    /// Concurrent sequences for the batched decode runs (0: none).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
    /// Context of each sequence in the batched decode runs.
    #[arg(long, default_value_t = 4096)]
    batch_context: usize,
    /// Cache data types of the batched decode runs, each a column (`none`: skip).
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    batch_cache_dtypes: Vec<String>,
    /// Cache data types compared on the built-in trained model (`none`: skip).
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16,f16")]
    cache_dtypes: Vec<String>,
    /// Weight data types compared on the built-in trained model (`none`: skip).
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16,f16")]
    weight_dtypes: Vec<String>,
    /// The type the main runs' products compute in: f32, or bf16 (with the weights converted to
    /// bf16; needs AMX or AVX512_BF16, else f32 — the table's header says which ran).
    #[arg(long, default_value = "f32")]
    compute_dtype: ComputeDtype,
    /// Compute types compared on the built-in trained model (`none`: skip): each runs with bf16
    /// weights when it computes in bf16 (products in bf16 need AMX or AVX512_BF16; without them the
    /// run says f32).
    #[arg(long, value_delimiter = ',', default_value = "bf16")]
    compute_dtypes: Vec<String>,
    /// The model of the data-type comparisons: `default` (the built-in trained model) or
    /// `preset` (the random model of `--preset` that the other runs use).
    #[arg(long, default_value = "default", value_parser = ["default", "preset"])]
    dtype_model: String,
    /// Context of the cache and weight data-type comparisons.
    #[arg(long, default_value_t = 16384)]
    dtype_context: usize,
    /// Prompt tokens of the worker-process runs: one process with every thread, then 1 × P
    /// and P × 1 grids of one thread each (0: skip).
    #[arg(long, default_value_t = 32768)]
    process_context: usize,
    /// The grids of the worker-process runs, `TxC` (tp × cp), comma-separated: `1x1` is one
    /// process with every thread, the others one thread per process (default: 1x1, 1xP and Px1
    /// with P the thread count, at least 2).
    #[arg(long, value_delimiter = ',')]
    process_grids: Vec<String>,
    /// `--device` of the worker processes: `cpu` or `cuda` (any grid on either).
    #[arg(long, default_value = "cpu")]
    process_device: String,
    /// A Python interpreter with PyTorch (`scripts/bench-torch.sh` makes one): adds yoco's
    /// prefill and decode at `--lengths` in f32 and bf16 compute beside PyTorch eager's in f32
    /// and bf16, on the same model, alternated.
    #[arg(long)]
    torch: Option<std::path::PathBuf>,
    /// The PyTorch side of `--torch` (default: the repository's tools/bench/torch_yoco.py).
    #[arg(long)]
    torch_script: Option<std::path::PathBuf>,
    /// Rounds of the `--torch` comparison; each runner keeps its best.
    #[arg(long, default_value_t = 3)]
    torch_rounds: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// The benchmark's prompt of `n` tokens (ids below 50,000, so that every preset's vocabulary
/// holds them).
pub(super) fn prompt(n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919) % 50000) as u32).collect()
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let Some(preset) = Preset::parse(&args.preset) else {
        bail!("unknown preset `{}`", args.preset);
    };
    let batch_dtypes = args
        .batch_cache_dtypes
        .iter()
        .filter(|n| *n != "none" && !n.is_empty())
        .map(|n| n.parse::<CacheDtype>().map_err(|e| anyhow::anyhow!("--batch-cache-dtypes: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut variants = Vec::new();
    for name in args.cache_dtypes.iter().filter(|n| *n != "none" && !n.is_empty()) {
        let cache = name.parse::<CacheDtype>().map_err(|e| anyhow::anyhow!("--cache-dtypes: {e}"))?;
        variants.push(Variant { cache, ..Variant::F32 });
    }
    for name in args.weight_dtypes.iter().filter(|n| *n != "none" && !n.is_empty()) {
        let weights = name.parse::<WeightDtype>().map_err(|e| anyhow::anyhow!("--weight-dtypes: {e}"))?;
        if weights == WeightDtype::Auto {
            bail!("--weight-dtypes: name the types to compare (f32, bf16, f16), not auto");
        }
        variants.push(Variant { weights, ..Variant::F32 });
    }
    for name in args.compute_dtypes.iter().filter(|n| *n != "none" && !n.is_empty()) {
        let compute = name.parse::<ComputeDtype>().map_err(|e| anyhow::anyhow!("--compute-dtypes: {e}"))?;
        if compute == ComputeDtype::Auto {
            bail!("--compute-dtypes: name the types to compare (f32, bf16), not auto");
        }
        variants.push(Variant { weights: compute.weights(WeightDtype::F32), compute, ..Variant::F32 });
    }
    let cfg = preset.config();
    let dir = tempfile_dir()?;
    write_random_model(&cfg, StoreDtype::F32, 0, false, &dir)?;
    let model = Arc::new(Model::load_as(&dir, args.compute_dtype.weights(WeightDtype::Auto))?);
    let threads = rayon::current_num_threads();
    let peak = gemm_gflops(2048);
    let bf16_peak = yoco_worker::ceilings::bf16_gemm_gflops(2048);
    // What the main runs compute in, and the ceiling their GFLOP/s are a fraction of.
    let ran = yoco_worker::backend::Backend::compute_name(&yoco_worker::backend::cpu::CpuBackend::for_model(
        &model,
        &EngineOptions { compute_dtype: args.compute_dtype, ..Default::default() },
    ));
    let run_peak = if ran == "bf16" { bf16_peak.unwrap_or(peak) } else { peak };
    let bandwidth = read_gbps(1 << 30);
    let flops_per_token = prefill_flops_per_token(&cfg);
    let cache_bytes_per_token = yoco_worker::plan::cache_bytes_per_token(&cfg, CacheDtype::F32);
    // What one decode token reads: every weight but the embedding table (one row of it; all of
    // it where the output projection is tied to it), and the global cache once per
    // cross-decoder layer. (The table's bytes are its own type's: counting them as f32
    // understated a bf16 model's reads threefold.)
    let untied_table = if model.output_projection.is_some() { model.embed_tokens.bytes() } else { 0 };
    let weight_bytes = model.weight_bytes() - untied_table;
    let read_per_token =
        |context: usize| (weight_bytes + cfg.n_cross_layers() * context * cache_bytes_per_token) as f64;
    if !args.json {
        println!(
            "yoco bench: preset {} ({} params), {threads} threads; weights {}, products in {}",
            args.preset,
            cfg.n_params(false),
            model.weight_dtype(),
            ran
        );
        println!("cpu: {}", yoco_worker::ceilings::cpu_summary());
        let bf16 = bf16_peak.map_or_else(|| "no AMX or AVX512_BF16".to_string(), |g| format!("{g:.1} GFLOP/s"));
        println!("machine: f32 GEMM 2048³ = {peak:.1} GFLOP/s, bf16 GEMM = {bf16}; memory read (1 GiB) = {bandwidth:.1} GB/s");
        println!("global cache: {cache_bytes_per_token} bytes/token (f32); weights streamed per decode token: {weight_bytes} bytes");
        println!(
            "{:>9} {:>10} {:>12} {:>10} {:>8} {:>12} {:>10} {:>9} {:>7}",
            "context",
            "prefill s",
            "prefill tok/s",
            "GFLOP/s",
            "of peak",
            "decode tok/s",
            "read GB/s",
            "bw GB/s",
            "of bw"
        );
    }
    let mut rows = Vec::new();
    for &n in &args.lengths {
        let opts = EngineOptions {
            cache_budget_bytes: (n + args.decode_rounds.max(1) * args.decode_tokens + 512) * cache_bytes_per_token * 2,
            compute_dtype: args.compute_dtype,
            ..Default::default()
        };
        let mut engine = Engine::new(model.clone(), &opts);
        engine.add_sequence(1)?;
        let prompt = prompt(n);
        let started = Instant::now();
        let mut last = Vec::new();
        for (i, part) in prompt.chunks(args.prefill_chunk).enumerate() {
            let is_last = (i + 1) * args.prefill_chunk >= n;
            let want = if is_last { Logits::Last } else { Logits::None };
            last = engine.step(&[StepItem::prefill(1, part, want)])?.remove(0).logits.into_vec();
        }
        let prefill = started.elapsed().as_secs_f64();
        // Decode rounds, each with the read ceiling measured just before and after it: on a
        // shared machine that ceiling moves by a quarter within minutes, so a round's own
        // neighbours give its fraction (the higher of the two, so the fraction is not
        // flattered). The fastest round is reported.
        let (mut decode, mut decode_gbps, mut bandwidth_beside) = (0.0f64, 0.0, bandwidth);
        let mut position = n;
        let mut bandwidth_before = read_gbps(1 << 30);
        for _ in 0..args.decode_rounds.max(1) {
            let started = Instant::now();
            for _ in 0..args.decode_tokens {
                let token = argmax(&last);
                last = engine.step(&[StepItem::decode(1, &[token])])?.remove(0).logits.into_vec();
            }
            let rate = args.decode_tokens as f64 / started.elapsed().as_secs_f64();
            let bandwidth_after = read_gbps(1 << 30);
            if rate > decode {
                decode = rate;
                decode_gbps = read_per_token(position + args.decode_tokens / 2) * rate / 1e9;
                bandwidth_beside = bandwidth_before.max(bandwidth_after);
            }
            position += args.decode_tokens;
            bandwidth_before = bandwidth_after;
        }
        let gflops = flops_per_token * n as f64 / prefill / 1e9;
        let row = json!({
            "context": n, "prefill_seconds": prefill, "prefill_tokens_per_second": n as f64 / prefill,
            "prefill_gflops": gflops, "prefill_fraction_of_gemm_peak": gflops / peak,
            "decode_tokens_per_second": decode, "decode_read_gbps": decode_gbps,
            "read_gbps_beside": bandwidth_beside, "decode_fraction_of_bandwidth": decode_gbps / bandwidth_beside,
            "cache_bytes": engine.sequence_cache_bytes(1),
        });
        if !args.json {
            println!(
                "{n:>9} {prefill:>10.2} {:>12.0} {gflops:>10.1} {:>7.0}% {decode:>12.1} {decode_gbps:>10.1} {bandwidth_beside:>9.1} {:>6.0}%",
                n as f64 / prefill,
                100.0 * gflops / run_peak,
                100.0 * decode_gbps / bandwidth_beside
            );
        }
        rows.push(row);
    }
    let mut batched = Vec::new();
    for dtype in batch_dtypes {
        batched.push((dtype, batched_decode(&model, &args, dtype, cache_bytes_per_token)?));
    }
    batched.retain(|(_, rates)| !rates.is_empty());
    if !args.json && !batched.is_empty() {
        println!("batched decode at {} tokens of context each (greedy, with log-probabilities):", args.batch_context);
        print!("{:>9}", "sequences");
        for (dtype, _) in &batched {
            print!(" {:>16} {:>7}", format!("{} cache tok/s", dtype.name()), "vs one");
        }
        println!();
        for (i, b) in batched[0].1.iter().map(|r| r.0).enumerate() {
            print!("{b:>9}");
            for (_, rates) in &batched {
                print!(" {:>16.1} {:>6.1}x", rates[i].1, rates[i].1 / rates[0].1);
            }
            println!();
        }
    }
    let processes = process_prefill(&args, &dir, threads, cache_bytes_per_token)?;
    if !args.json && !processes.is_empty() {
        println!(
            "{} prompt tokens, then {} decoded, through worker processes (--device {}) as tp × cp grids (gRPC plans, TCP collectives):",
            args.process_context, args.decode_tokens, args.process_device
        );
        println!(
            "{:>5} {:>13} {:>10} {:>13} {:>8} {:>12} {:>24} {:>24}",
            "tp×cp",
            "threads each",
            "prefill s",
            "prefill tok/s",
            "vs P=1",
            "decode tok/s",
            "prefill coll. ms/step",
            "decode coll. ms/step"
        );
        let one = processes.iter().find(|p| p.world() == 1).map(|p| p.prefill_seconds);
        for p in &processes {
            let coll = |c: &CollectiveTotals| {
                format!(
                    "{:.1} (tp {:.1}, cp {:.1})",
                    per_step_ms(c, |c| c.seconds),
                    per_step_ms(c, |c| c.tp_seconds),
                    per_step_ms(c, |c| c.cp_seconds)
                )
            };
            println!(
                "{:>5} {:>13} {:>10.2} {:>13.0} {:>8} {:>12.1} {:>24} {:>24}",
                format!("{}×{}", p.tp, p.cp),
                p.threads_each,
                p.prefill_seconds,
                args.process_context as f64 / p.prefill_seconds,
                one.map_or("-".to_string(), |one| format!("{:.2}x", one / p.prefill_seconds)),
                p.decode_tokens_per_second,
                coll(&p.prefill),
                coll(&p.decode)
            );
        }
    }
    let dtypes = dtype_runs(&args, variants, &dir)?;
    if !args.json && !dtypes.is_empty() {
        println!(
            "data types on the {} at {} tokens of context (log-probabilities of the last {} prompt tokens against all-f32):",
            if args.dtype_model == "preset" { format!("{} preset's random model", args.preset) } else { "built-in model".to_string() },
            args.dtype_context, DTYPE_SCORED
        );
        println!(
            "{:>6} {:>8} {:>8} {:>11} {:>13} {:>13} {:>12} {:>14} {:>14} {:>12}",
            "cache",
            "weights",
            "compute",
            "cache B/tok",
            "weight bytes",
            "prefill tok/s",
            "decode tok/s",
            "max |Δlogp|",
            "mean |Δlogp|",
            "same argmax"
        );
        for d in &dtypes {
            println!(
                "{:>6} {:>8} {:>8} {:>11} {:>13} {:>13.0} {:>12.1} {:>14.2e} {:>14.2e} {:>11.1}%",
                d.variant.cache.name(),
                d.variant.weights.name(),
                d.compute,
                d.bytes_per_token,
                d.weight_bytes,
                d.prefill_tokens_per_second,
                d.decode_tokens_per_second,
                d.max_abs_logprob_diff,
                d.mean_abs_logprob_diff,
                100.0 * d.argmax_agreement
            );
        }
    }
    let torch = match &args.torch {
        Some(python) => {
            let script = args.torch_script.clone().unwrap_or_else(super::bench_torch::default_script);
            let o = super::bench_torch::Options {
                python,
                script: &script,
                model_dir: &dir,
                lengths: &args.lengths,
                decode_tokens: args.decode_tokens,
                prefill_chunk: args.prefill_chunk,
                rounds: args.torch_rounds,
                threads,
                cache_bytes_per_token,
            };
            let c = super::bench_torch::run(&o)?;
            if !args.json {
                c.print(&args.lengths, args.torch_rounds.max(1), threads);
            }
            Some(c)
        }
        None => None,
    };
    let dtype_json = |kind: &str| -> Vec<serde_json::Value> {
        dtypes
            .iter()
            .filter(|d| {
                let v = d.variant;
                let of_kind = match kind {
                    "cache" => v.cache != CacheDtype::F32,
                    "weights" => v.weights != WeightDtype::F32 && v.compute == ComputeDtype::F32,
                    _ => v.compute != ComputeDtype::F32,
                };
                of_kind || v == Variant::F32
            })
            .map(|d| {
                let dtype = match kind {
                    "cache" => d.variant.cache.name(),
                    "weights" => d.variant.weights.name(),
                    _ => d.compute,
                };
                json!({
                    "dtype": dtype, "context": args.dtype_context, "bytes_per_token": d.bytes_per_token,
                    "weight_bytes": d.weight_bytes, "weight_dtype": d.variant.weights.name(),
                    "prefill_tokens_per_second": d.prefill_tokens_per_second,
                    "decode_tokens_per_second": d.decode_tokens_per_second,
                    "max_abs_logprob_diff_vs_f32": d.max_abs_logprob_diff,
                    "mean_abs_logprob_diff_vs_f32": d.mean_abs_logprob_diff,
                    "argmax_agreement_vs_f32": d.argmax_agreement,
                })
            })
            .collect()
    };
    if args.json {
        let out = json!({
            "preset": args.preset, "dtype_model": args.dtype_model, "threads": threads, "cpu": yoco_worker::ceilings::cpu_summary(), "gemm_gflops_2048": peak, "read_gbps": bandwidth,
            "bf16_gemm_gflops_2048": bf16_peak, "compute_dtype": args.compute_dtype.name(),
            "cache_bytes_per_token": cache_bytes_per_token, "decode_weight_bytes": weight_bytes,
            "prefill_flops_per_token": flops_per_token, "runs": rows,
            "batched_decode": batched.iter().flat_map(|(dtype, rates)| rates.iter().map(move |(b, r)| json!({
                "sequences": b, "context": args.batch_context, "cache_dtype": dtype.name(), "tokens_per_second": r,
            }))).collect::<Vec<_>>(),
            "process_prefill": processes.iter().map(|p| json!({
                "device": args.process_device, "processes": p.world(), "tp": p.tp, "cp": p.cp, "threads_each": p.threads_each,
                "tokens": args.process_context, "prefill_seconds": p.prefill_seconds,
                "prefill_tokens_per_second": args.process_context as f64 / p.prefill_seconds,
                "decode_tokens": args.decode_tokens, "decode_tokens_per_second": p.decode_tokens_per_second,
                "prefill_collectives": p.prefill, "decode_collectives": p.decode,
                "prefill_collective_ms_per_step": per_step_ms(&p.prefill, |c| c.seconds),
                "decode_collective_ms_per_step": per_step_ms(&p.decode, |c| c.seconds),
            })).collect::<Vec<_>>(),
            "cache_dtypes": dtype_json("cache"),
            "weight_dtypes": dtype_json("weights"),
            "compute_dtypes": dtype_json("compute"),
            "against_torch": torch.as_ref().map(|c| c.to_json()),
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
/// each `b` of `--batches`, through the executor that serving runs: each step samples every
/// sequence's next token (greedy) with its log-probability. Every batch is prefilled first; then
/// the batches take turns, three rounds of `--decode-tokens` steps each, and each keeps its best
/// round: the ratios between them are what matters, and on a shared machine a slow spell would
/// otherwise fall on one of them only. The global cache holds `cache_dtype` elements; products
/// compute in `--compute-dtype`, as the main table's.
fn batched_decode(
    model: &Arc<Model>,
    args: &Args,
    cache_dtype: CacheDtype,
    cache_bytes_per_token: usize,
) -> anyhow::Result<Vec<(usize, f64)>> {
    const ROUNDS: usize = 3;
    let steps = args.decode_tokens.max(4);
    let mut batches = Vec::new();
    for &b in args.batches.iter().filter(|&&b| b > 0) {
        let opts = EngineOptions {
            cache_budget_bytes: b * (args.batch_context + ROUNDS * steps + 512) * cache_bytes_per_token * 2,
            cache_dtype,
            // As the main table's runs: batches of 8 rows and more take bf16 products there.
            compute_dtype: args.compute_dtype,
            ..Default::default()
        };
        let mut executor = Executor::new(Engine::new(model.clone(), &opts));
        let add = (0..b as u64).map(|seq| SeqSpec { seq, ..Default::default() }).collect();
        executor.execute(&Plan { add, ..Default::default() })?;
        let mut last = Vec::new();
        for seq in 0..b as u64 {
            let prompt: Vec<u32> =
                (0..args.batch_context).map(|i| ((i * 7919 + seq as usize * 13) % 50000) as u32).collect();
            let chunks = prompt.len().div_ceil(args.prefill_chunk);
            for (i, part) in prompt.chunks(args.prefill_chunk).enumerate() {
                let sample = i + 1 == chunks;
                let prefill = vec![PrefillWork { seq, tokens: part.to_vec(), sample, ..Default::default() }];
                let out = executor.execute(&Plan { prefill, ..Default::default() })?;
                if let Some(s) = out.into_iter().next().and_then(|r| r.sampled) {
                    last.push(s.token);
                }
            }
        }
        batches.push((b, executor, last, 0f64));
    }
    for _ in 0..ROUNDS {
        for (b, executor, last, best) in &mut batches {
            let started = Instant::now();
            for _ in 0..steps {
                let decode = last.iter().enumerate().map(|(s, &token)| DecodeWork { seq: s as u64, token }).collect();
                let outs = executor.execute(&Plan { decode, ..Default::default() })?;
                *last = outs.iter().map(|o| o.sampled.as_ref().map_or(0, |s| s.token)).collect();
            }
            *best = best.max((*b * steps) as f64 / started.elapsed().as_secs_f64());
        }
    }
    Ok(batches.into_iter().map(|(b, _, _, best)| (b, best)).collect())
}

struct ProcessRun {
    tp: usize,
    cp: usize,
    threads_each: usize,
    prefill_seconds: f64,
    decode_tokens_per_second: f64,
    /// Collective time of the prefill steps and of the decode steps.
    prefill: CollectiveTotals,
    decode: CollectiveTotals,
}

impl ProcessRun {
    fn world(&self) -> usize {
        self.tp * self.cp
    }
}

/// A group that books each step's collective time as prefill's or decode's.
struct Booked<'a> {
    group: &'a mut crate::cluster::group::BlockingGroup,
    prefill: CollectiveTotals,
    decode: CollectiveTotals,
}

impl PlanRunner for Booked<'_> {
    fn cp_size(&self) -> usize {
        self.group.cp_size()
    }
    fn run(&mut self, plan: &Plan) -> Result<Vec<Vec<SeqResult>>, RunError> {
        let before = self.group.group().collectives();
        let out = self.group.run(plan)?;
        let after = self.group.group().collectives();
        // A plan that only frees a sequence is neither.
        let book = match (plan.prefill.is_empty(), plan.decode.is_empty()) {
            (false, _) => &mut self.prefill,
            (true, false) => &mut self.decode,
            (true, true) => return Ok(out),
        };
        book.steps += after.steps - before.steps;
        book.seconds += after.seconds - before.seconds;
        book.tp_seconds += after.tp_seconds - before.tp_seconds;
        book.cp_seconds += after.cp_seconds - before.cp_seconds;
        Ok(out)
    }
}

/// The same prompt prefilled and decoded through worker processes: one process with every
/// thread, then grids of one thread per process, `1 × P` (context parallel) and `P × 1`
/// (tensor parallel), with the time their steps spend in collectives.
fn process_prefill(
    args: &Args,
    model_dir: &std::path::Path,
    threads: usize,
    cache_bytes_per_token: usize,
) -> anyhow::Result<Vec<ProcessRun>> {
    use yoco_worker::generate::{generate, GenerateParams};
    if args.process_context == 0 {
        return Ok(Vec::new());
    }
    let prompt: Vec<u32> = (0..args.process_context).map(|i| ((i * 7919) % 50000) as u32).collect();
    let params = GenerateParams {
        max_tokens: args.decode_tokens.max(1),
        prefill_chunk: args.prefill_chunk,
        stop_token_ids: Vec::new(),
        ..GenerateParams::default()
    };
    let grids = process_grids(&args.process_grids, threads)?;
    let mut out = Vec::new();
    for (tp, cp) in grids {
        let threads_each = if tp * cp == 1 { threads } else { 1 };
        let opts = crate::cluster::group::GroupOptions {
            cache_budget_bytes: (args.process_context / cp + args.decode_tokens + 4096) * cache_bytes_per_token,
            cache_dtype: CacheDtype::F32,
            weight_dtype: WeightDtype::F32,
            collective_timeout: std::time::Duration::from_secs(600),
            transport: "tcp".into(),
            tls: None,
            allow_plaintext: false,
            local_worker_threads: Some(threads_each),
            tp,
            max_sequences: 0,
            // Named, so that a machine with a GPU runs the CPU's benchmark unless asked.
            local_device: Some(args.process_device.clone()),
            prefix_disk_dir: None,
            compute_dtype: Default::default(),
        };
        let mut group = crate::cluster::group::BlockingGroup::spawn(tp * cp, model_dir, &opts)?;
        let mut booked = Booked { group: &mut group, prefill: Default::default(), decode: Default::default() };
        let gen = generate(&mut booked, 0, &prompt, &params, &mut |_| {}).map_err(|e| anyhow::anyhow!("{e}"))?;
        out.push(ProcessRun {
            tp,
            cp,
            threads_each,
            prefill_seconds: gen.timing.prefill_seconds,
            decode_tokens_per_second: gen.timing.decode_tokens_per_second,
            prefill: booked.prefill,
            decode: booked.decode,
        });
    }
    Ok(out)
}

/// `--process-grids` as (tp, cp) pairs; the default is 1×1, 1×P and P×1.
fn process_grids(names: &[String], threads: usize) -> anyhow::Result<Vec<(usize, usize)>> {
    let ranks = threads.max(2);
    if names.is_empty() {
        return Ok(vec![(1, 1), (1, ranks), (ranks, 1)]);
    }
    let grids: Vec<(usize, usize)> = names
        .iter()
        .map(|name| {
            let parse = |s: &str| s.trim().parse::<usize>().ok().filter(|&n| (1..=64).contains(&n));
            match name.split_once(['x', '×']) {
                Some((tp, cp)) => match (parse(tp), parse(cp)) {
                    (Some(tp), Some(cp)) => Ok((tp, cp)),
                    _ => bail!("--process-grids: `{name}`: tp and cp are whole numbers from 1 to 64"),
                },
                None => bail!("--process-grids: `{name}`: expected TxC, e.g. 1x2"),
            }
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(grids)
}

/// Milliseconds per step of collective time.
fn per_step_ms(c: &CollectiveTotals, f: fn(&CollectiveTotals) -> f64) -> f64 {
    if c.steps == 0 {
        0.0
    } else {
        f(c) * 1e3 / c.steps as f64
    }
}

/// Prompt positions whose log-probabilities the data-type comparison scores.
const DTYPE_SCORED: usize = 512;

/// The data types of one run: the global cache's, the weight matrices' and the products'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Variant {
    cache: CacheDtype,
    weights: WeightDtype,
    compute: ComputeDtype,
}

impl Variant {
    const F32: Variant = Variant { cache: CacheDtype::F32, weights: WeightDtype::F32, compute: ComputeDtype::F32 };
}

struct DtypeRun {
    variant: Variant,
    bytes_per_token: usize,
    weight_bytes: usize,
    /// The products' type as run (bf16 asked on a CPU without AMX or AVX512_BF16 runs f32).
    compute: &'static str,
    prefill_tokens_per_second: f64,
    decode_tokens_per_second: f64,
    max_abs_logprob_diff: f64,
    mean_abs_logprob_diff: f64,
    argmax_agreement: f64,
}

/// Each variant on the built-in trained model (real weights, so the log-probabilities are
/// peaked as in use): a prompt of `dtype_context` tokens whose last [`DTYPE_SCORED`] positions
/// are scored (each reads the whole cache before it), compared with all-f32 (run first), then
/// decode speed at that context.
fn dtype_runs(args: &Args, mut order: Vec<Variant>, preset_dir: &std::path::Path) -> anyhow::Result<Vec<DtypeRun>> {
    if order.is_empty() {
        return Ok(Vec::new());
    }
    let dir = match args.dtype_model.as_str() {
        "preset" => preset_dir.to_path_buf(),
        _ => crate::default_model::resolve(None)?,
    };
    order.insert(0, Variant::F32); // the others compare with it
    let mut seen = Vec::new();
    order.retain(|v| {
        let new = !seen.contains(v);
        seen.push(*v);
        new
    });
    let mut reference: Option<Vec<Vec<f32>>> = None;
    let mut out = Vec::new();
    for variant in order {
        let model = Arc::new(Model::load_as(&dir, variant.weights)?);
        let n = args.dtype_context.max(DTYPE_SCORED + 1);
        let vocab = model.cfg.vocab_size as u32;
        // A fixed pseudo-random walk over the vocabulary: no tokenizer or text needed.
        let prompt: Vec<u32> = (0..n).map(|i| ((i as u64 * 2654435761 + 12345) % vocab as u64) as u32).collect();
        let scored_from = n - DTYPE_SCORED;
        let bytes_per_token = yoco_worker::plan::cache_bytes_per_token(&model.cfg, variant.cache);
        let opts = EngineOptions {
            cache_budget_bytes: (n + args.decode_tokens + 1024) * bytes_per_token * 2,
            cache_dtype: variant.cache,
            compute_dtype: variant.compute,
            ..Default::default()
        };
        let mut engine = Engine::new(model.clone(), &opts);
        engine.add_sequence(1)?;
        let started = Instant::now();
        for part in prompt[..scored_from].chunks(args.prefill_chunk) {
            engine.step(&[StepItem::prefill(1, part, Logits::None)])?;
        }
        let prefill_tokens_per_second = scored_from as f64 / started.elapsed().as_secs_f64();
        let logits = engine.step(&[StepItem::prefill(1, &prompt[scored_from..], Logits::All)])?.remove(0).logits;
        let rows: Vec<Vec<f32>> = logits.chunks_exact(vocab as usize).map(log_softmax).collect();
        let mut last = rows.last().map(|r| argmax(r)).unwrap_or(0);
        let started = Instant::now();
        for _ in 0..args.decode_tokens {
            last = argmax(&engine.step(&[StepItem::decode(1, &[last])])?.remove(0).logits);
        }
        let decode_tokens_per_second = args.decode_tokens as f64 / started.elapsed().as_secs_f64();
        let reference = reference.get_or_insert_with(|| rows.clone());
        let (mut max, mut sum, mut same) = (0f64, 0f64, 0usize);
        for (r, (row, want)) in rows.iter().zip(reference.iter()).enumerate() {
            // The log-probability of the prompt's next token (the last row scores the argmax).
            let next = prompt.get(scored_from + r + 1).map_or_else(|| argmax(want), |&t| t) as usize;
            let diff = (row[next] as f64 - want[next] as f64).abs();
            (max, sum) = (max.max(diff), sum + diff);
            same += usize::from(argmax(row) == argmax(want));
        }
        out.push(DtypeRun {
            variant,
            bytes_per_token,
            weight_bytes: model.weight_bytes(),
            compute: yoco_worker::backend::Backend::compute_name(engine.backend()),
            prefill_tokens_per_second,
            decode_tokens_per_second,
            max_abs_logprob_diff: max,
            mean_abs_logprob_diff: sum / rows.len() as f64,
            argmax_agreement: same as f64 / rows.len() as f64,
        });
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::process_grids;

    #[test]
    fn process_grids_parse_and_default() {
        assert_eq!(process_grids(&[], 4).unwrap(), vec![(1, 1), (1, 4), (4, 1)]);
        assert_eq!(process_grids(&[], 1).unwrap(), vec![(1, 1), (1, 2), (2, 1)]);
        let names: Vec<String> = ["1x2", "2×1", " 1 x 1 "].iter().map(|s| s.to_string()).collect();
        assert_eq!(process_grids(&names, 2).unwrap(), vec![(1, 2), (2, 1), (1, 1)]);
        for bad in ["2", "0x1", "1x", "ax2", "1x65"] {
            let err = process_grids(&[bad.to_string()], 2).unwrap_err().to_string();
            assert!(err.contains("--process-grids"), "{bad}: {err}");
        }
    }
}
