//! `yoco generate`: one prompt through a local engine, printed as text or as one JSON object.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::json;
use yoco_proto::v1::generate_request::Prompt;
use yoco_worker::engine::{Engine, EngineOptions};
use yoco_worker::executor::Executor;
use yoco_worker::generate::{generate, GenerateParams, PlanRunner, Progress};
use yoco_worker::kernels::kv_block::CacheDtype;
use yoco_worker::model::Model;
use yoco_worker::sampling::SamplingParams;
use yoco_worker::tokenizer::Tokenizer;
use yoco_worker::weights::WeightDtype;

#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
pub struct Args {
    /// Model directory (params.json, *.safetensors, optional tokenizer.json); default: the
    /// built-in default model (trained by tools/train/).
    #[arg(long, env = "YOCO_MODEL")]
    model: Option<PathBuf>,
    #[command(flatten)]
    input: crate::cli::prompt_args::PromptArgs,
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 keeps all tokens.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Divides the positive logits (multiplies the negative ones) of tokens already in the
    /// prompt or the output; in (0, 10], 1 is off.
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Subtracted from the logits of tokens generated at least once; in [-2, 2], 0 is off.
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated; in [-2, 2], 0 is off.
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Seed of the sampler (default: random; printed in the JSON).
    #[arg(long)]
    seed: Option<u64>,
    /// Return the K most likely tokens at each generated position.
    #[arg(long)]
    logprobs: Option<usize>,
    /// Return the log-probability of every prompt token.
    #[arg(long)]
    prompt_logprobs: bool,
    /// Keep generating past the end-of-text token.
    #[arg(long)]
    ignore_eos: bool,
    #[arg(long)]
    json: bool,
    /// Global KV cache budget in MiB.
    #[arg(long, default_value_t = 8192, env = "YOCO_CACHE_MIB")]
    cache_mib: usize,
    /// Element type of the global KV cache: f32, bf16 or f16.
    #[arg(long, default_value = "f32", env = "YOCO_CACHE_DTYPE")]
    cache_dtype: CacheDtype,
    /// Element type of the weight matrices: auto (as stored), f32, bf16 or f16.
    #[arg(long, default_value = "auto", env = "YOCO_WEIGHT_DTYPE")]
    weight_dtype: WeightDtype,
    /// Prompt tokens per rank per prefill step.
    #[arg(long, default_value_t = 4096)]
    prefill_chunk: usize,
    /// Run on this many worker processes (context-parallel prefill, sharded cache) instead of
    /// in this process.
    #[arg(long)]
    workers: Option<usize>,
    /// Tensor-parallel size of the workers' group (`--workers` must be a multiple): rows of
    /// `tp` ranks split the weights, columns split the tokens.
    #[arg(long, default_value_t = 1, requires = "workers")]
    tp: usize,
    /// Collective transport between the workers: tcp, or nccl (rank r on GPU r; needs a build
    /// with the `cuda` feature).
    #[arg(long, default_value = "tcp")]
    transport: String,
    /// Seconds a collective waits for a peer before the group fails.
    #[arg(long, default_value_t = 120.0)]
    collective_timeout: f64,
    /// Where the model runs in this process: cpu (the engine), cuda (GPU 0, the CUDA backend;
    /// needs a build with the `cuda` feature), or auto: cuda when this build has it and a GPU
    /// is present, else cpu (logged).
    #[arg(long, default_value = "auto", env = "YOCO_DEVICE")]
    device: DeviceArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

/// The device the model runs on: `--device`, with `auto` resolved (one log line when a CUDA
/// build finds no GPU). Worker processes are started with `--device cpu` here: `--workers`
/// is the CPU engine's context and tensor parallelism.
fn choose_device(asked: DeviceArg, workers: Option<usize>) -> anyhow::Result<DeviceArg> {
    match (asked, workers) {
        (DeviceArg::Cuda, Some(_)) => bail!(
            "--device cuda runs in this process; it does not take --workers (for a group of GPU workers: \
             yoco serve --workers N --worker-device cuda)"
        ),
        (DeviceArg::Auto, Some(_)) | (DeviceArg::Cpu, _) => Ok(DeviceArg::Cpu),
        (DeviceArg::Cuda, None) if !cfg!(feature = "cuda") => {
            bail!("--device cuda: this yoco was built without the `cuda` feature (cargo build --features cuda)")
        }
        (DeviceArg::Cuda, None) => Ok(DeviceArg::Cuda),
        (DeviceArg::Auto, None) => {
            #[cfg(feature = "cuda")]
            {
                if yoco_worker::cuda::driver::gpu_count() > 0 {
                    return Ok(DeviceArg::Cuda);
                }
                tracing::info!("no GPU found (no NVIDIA driver or no device): running on the CPU backend");
            }
            Ok(DeviceArg::Cpu)
        }
    }
}

/// The engine on GPU 0's CUDA backend, its cache sized by `--cache-mib`.
#[cfg(feature = "cuda")]
fn cuda_runner(model: &Model, opts: &EngineOptions) -> anyhow::Result<Box<dyn PlanRunner>> {
    let gpu = yoco_worker::cuda::driver::CudaBackend::open(0).context("--device cuda")?;
    let info = gpu.runtime().info().clone();
    tracing::info!(gpu = %info.name, capability = ?info.capability, memory_gib = info.total_bytes >> 30, "CUDA backend");
    let engine = Engine::on_backend(gpu, model, opts, Box::new(yoco_worker::comm::SingleRank))?;
    Ok(Box::new(Executor::new(engine)))
}

#[cfg(not(feature = "cuda"))]
fn cuda_runner(_: &Model, _: &EngineOptions) -> anyhow::Result<Box<dyn PlanRunner>> {
    unreachable!("choose_device refuses cuda in a build without it")
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = crate::default_model::resolve(args.model.clone())?;
    let load_started = Instant::now();
    let model =
        Arc::new(Model::load_as(&dir, args.weight_dtype).with_context(|| format!("loading model {}", dir.display()))?);
    let tokenizer = Tokenizer::for_model_dir(&dir)?;
    tracing::info!(model = %dir.display(), seconds = load_started.elapsed().as_secs_f64(), "model loaded");

    let prompt = match args.input.read()? {
        Prompt::Text(text) => tokenizer.encode(&text)?,
        Prompt::TokenIds(ids) => ids.ids,
    };
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let vocab = model.cfg.vocab_size;
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        bail!("prompt token id {bad} is out of the model's vocabulary (size {vocab})");
    }
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        seed: args.seed.unwrap_or_else(rand_seed),
        repetition_penalty: args.repetition_penalty,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
    };
    sampling.validate()?;
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampling: sampling.clone(),
        top_logprobs: args.logprobs.unwrap_or(0),
        prompt_logprobs: args.prompt_logprobs,
        stop_token_ids: if args.ignore_eos { vec![] } else { tokenizer.eos_token().into_iter().collect() },
        prefill_chunk: args.prefill_chunk.max(1),
    };
    let mut device = choose_device(args.device, args.workers)?;
    let engine_opts = EngineOptions {
        cache_budget_bytes: args.cache_mib << 20,
        cache_dtype: args.cache_dtype,
        ..EngineOptions::default()
    };
    let cpu_engine = || -> Box<dyn PlanRunner> { Box::new(Executor::new(Engine::new(model.clone(), &engine_opts))) };
    let mut runner: Box<dyn PlanRunner> = match args.workers {
        None if device == DeviceArg::Cuda => match cuda_runner(&model, &engine_opts) {
            Ok(runner) => runner,
            // `auto` found a driver, but the GPU cannot serve (no cuBLAS or NVRTC, no memory…).
            Err(e) if args.device == DeviceArg::Auto => {
                tracing::warn!(error = %format!("{e:#}"), "the GPU cannot be used: running on the CPU backend");
                device = DeviceArg::Cpu;
                cpu_engine()
            }
            Err(e) => return Err(e),
        },
        None => cpu_engine(),
        Some(0) => bail!("--workers must be at least 1"),
        Some(p) => {
            let opts = crate::cluster::group::GroupOptions {
                cache_budget_bytes: args.cache_mib << 20,
                cache_dtype: args.cache_dtype,
                weight_dtype: args.weight_dtype,
                collective_timeout: std::time::Duration::from_secs_f64(args.collective_timeout.max(0.001)),
                transport: args.transport.clone(),
                tls: None,
                allow_plaintext: false,
                local_worker_threads: None,
                tp: args.tp,
                // `generate` runs one request.
                max_sequences: 1,
                local_device: Some("cpu".into()),
                prefix_disk_dir: None,
                compute_dtype: Default::default(),
            };
            model.cfg.check_tp(args.tp)?;
            if args.tp == 0 || !p.is_multiple_of(args.tp) {
                bail!("--tp {} must divide --workers {p}", args.tp);
            }
            Box::new(crate::cluster::group::BlockingGroup::spawn(p, &dir, &opts)?)
        }
    };
    let mut progress = progress_printer(prompt.len() > params.prefill_chunk * runner.cp_size());
    let gen = generate(&mut *runner, 0, &prompt, &params, &mut progress).map_err(|e| anyhow::anyhow!("{e}"))?;
    let text = tokenizer.decode(&gen.tokens);

    if !args.json {
        println!("{text}");
        eprintln!(
            "[{} prompt tokens, {} generated ({:?}); prefill {:.0} tok/s, decode {:.1} tok/s]",
            prompt.len(),
            gen.tokens.len(),
            gen.finish_reason,
            gen.timing.prefill_tokens_per_second,
            gen.timing.decode_tokens_per_second
        );
        return Ok(());
    }
    let top = |steps: &Vec<Vec<(u32, f32)>>| -> serde_json::Value {
        steps
            .iter()
            .map(|alts| alts.iter().map(|(t, lp)| json!({"token": t, "logprob": lp})).collect::<Vec<_>>())
            .collect()
    };
    let bytes_per_token = yoco_worker::plan::cache_bytes_per_token(&model.cfg, args.cache_dtype);
    let out = json!({
        "device": if device == DeviceArg::Cuda { "cuda" } else { "cpu" },
        "workers": runner.cp_size(),
        "model": dir.display().to_string(),
        "tokenizer": tokenizer.name(),
        "prompt_tokens": prompt,
        "tokens": gen.tokens,
        "logprobs": gen.logprobs,
        "top_logprobs": if args.logprobs.is_some() { top(&gen.top_logprobs) } else { serde_json::Value::Null },
        "prompt_logprobs": gen.prompt_logprobs,
        "text": text,
        "finish_reason": gen.finish_reason,
        "seed": sampling.seed,
        "usage": {
            "prompt_tokens": prompt.len(),
            "completion_tokens": gen.tokens.len(),
            "total_tokens": prompt.len() + gen.tokens.len(),
        },
        "timing": gen.timing,
        "weights": { "dtype": model.weight_dtype(), "bytes": model.weight_bytes() },
        "cache": {
            "dtype": args.cache_dtype.name(),
            "bytes_per_token": bytes_per_token,
            "global_cache_bytes": gen.shard_tokens.iter().sum::<usize>() * bytes_per_token,
            "per_rank": gen.shard_tokens.iter().enumerate().map(|(rank, &tokens)| {
                json!({"rank": rank, "tokens": tokens, "bytes": tokens * bytes_per_token})
            }).collect::<Vec<_>>(),
        },
    });
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// Prints prefill progress to stderr for long prompts: a rewritten line on a terminal, a line
/// every few seconds otherwise.
fn progress_printer(enabled: bool) -> impl FnMut(Progress) {
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_print = Instant::now();
    move |p: Progress| {
        if !enabled {
            return;
        }
        let done = p.prefilled == p.total;
        if !done && last_print.elapsed().as_secs_f64() < if tty { 0.2 } else { 5.0 } {
            return;
        }
        last_print = Instant::now();
        let secs = started.elapsed().as_secs_f64();
        let rate = p.prefilled as f64 / secs.max(1e-9);
        let eta = (p.total - p.prefilled) as f64 / rate.max(1e-9);
        let line = format!(
            "prefill {}/{} tokens ({:.0}%), {:.0} tok/s, ETA {:.0}s",
            p.prefilled,
            p.total,
            100.0 * p.prefilled as f64 / p.total as f64,
            rate,
            eta
        );
        if tty {
            eprint!("\r{line}\x1b[K{}", if done { "\n" } else { "" });
        } else {
            eprintln!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without a GPU (CI), with or without the `cuda` feature: `auto` is the CPU,
    /// a worker group is the CPU, and an explicit `cuda` is an error, never a panic — refused
    /// up front by a build without the feature, or by the driver probe of one with it.
    #[test]
    fn without_a_gpu_auto_is_the_cpu_and_cuda_is_a_clean_error() {
        assert_eq!(choose_device(DeviceArg::Auto, None).unwrap(), DeviceArg::Cpu);
        assert_eq!(choose_device(DeviceArg::Auto, Some(2)).unwrap(), DeviceArg::Cpu);
        assert_eq!(choose_device(DeviceArg::Cpu, None).unwrap(), DeviceArg::Cpu);
        assert!(choose_device(DeviceArg::Cuda, Some(2)).unwrap_err().to_string().contains("--workers"));
        let explicit = choose_device(DeviceArg::Cuda, None);
        #[cfg(not(feature = "cuda"))]
        {
            let e = explicit.unwrap_err();
            assert!(e.to_string().contains("without the `cuda` feature"), "{e}");
        }
        #[cfg(feature = "cuda")]
        {
            assert_eq!(explicit.unwrap(), DeviceArg::Cuda);
            let err = yoco_worker::cuda::driver::CudaBackend::open(0).err().expect("no GPU in CI");
            assert!(matches!(err, yoco_worker::cuda::runtime::DeviceError::NoDriver), "{err}");
        }
    }
}
