//! The engine on a backend at long contexts: prefill time and decode tokens/s at each context,
//! bytes of cache per token, and (on a GPU) device memory used. One sequence, prefilled in steps
//! of `--chunk` tokens, greedy decode.
//!
//!   cargo run --release -p yoco-worker --example backend_bench [--features cuda] -- \
//!       [--device cpu|cuda] [--preset tiny|small|3b] [--dtype f32|bf16|f16] \
//!       [--contexts 131072,524288,1048576] [--decode 16] [--chunk 16384] [--model DIR]
//!
//! The model is the preset with random weights, written to DIR (default under the system temp
//! folder) once and memory-mapped. For the 3b preset in bf16 on a GPU this is the benchmark of
//! the CUDA issue; the YOCO paper reports under 6 s to prefill 512K tokens on an H100 and 12.4 GB
//! of memory at 1M.

use std::path::PathBuf;
use std::time::Instant;

use yoco_worker::backend::Backend;
use yoco_worker::comm::SingleRank;
use yoco_worker::engine::{Engine, EngineOptions, Logits, StepItem};
use yoco_worker::kernels::kv_block::CacheDtype;
use yoco_worker::model::Model;
use yoco_worker::presets::{write_random_model, Preset, StoreDtype};

struct Args {
    device: String,
    preset: String,
    dtype: String,
    contexts: Vec<usize>,
    decode: usize,
    chunk: usize,
    model: Option<PathBuf>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        device: "cpu".into(),
        preset: "tiny".into(),
        dtype: "bf16".into(),
        contexts: vec![4096, 16384],
        decode: 16,
        chunk: 16384,
        model: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => a.device = value()?,
            "--preset" => a.preset = value()?,
            "--dtype" => a.dtype = value()?,
            "--contexts" => {
                a.contexts = value()?
                    .split(',')
                    .map(|s| s.parse().map_err(|e| format!("--contexts: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--decode" => a.decode = value()?.parse().map_err(|e| format!("--decode: {e}"))?,
            "--chunk" => a.chunk = value()?.parse().map_err(|e| format!("--chunk: {e}"))?,
            "--model" => a.model = Some(value()?.into()),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

fn run<B: Backend>(backend: B, model: &Model, args: &Args, memory: &dyn Fn(&B) -> Option<f64>) -> Result<(), String> {
    let cache_dtype: CacheDtype = args.dtype.parse()?;
    let longest = args.contexts.iter().max().copied().unwrap_or(0) + args.decode;
    let bytes_per_token = yoco_worker::plan::cache_bytes_per_token(&model.cfg, cache_dtype);
    let opts = EngineOptions {
        cache_dtype,
        cache_budget_bytes: (longest + 2 * yoco_worker::plan::DEFAULT_BLOCK_TOKENS) * bytes_per_token,
        ..EngineOptions::default()
    };
    let start = Instant::now();
    let mut e = Engine::on_backend(backend, model, &opts, Box::new(SingleRank)).map_err(|e| e.to_string())?;
    println!(
        "# {} backend: model ready in {:.1} s, {bytes_per_token} B of cache per token",
        e.backend().name(),
        start.elapsed().as_secs_f64(),
    );
    println!("| context | prefill s | prefill tok/s | decode tok/s | cache MB | device memory GB |");
    println!("|---|---|---|---|---|---|");
    let vocab = model.cfg.vocab_size as u64;
    let step = |e: &mut Engine<B>, item: StepItem| -> Result<Vec<f32>, String> {
        Ok(e.step(&[item]).map_err(|e| e.to_string())?.remove(0).logits.into_vec())
    };
    for &n in &args.contexts {
        let prompt: Vec<u32> = (0..n as u64).map(|i| ((i * 2_654_435_761 + 17) % vocab) as u32).collect();
        e.add_sequence(1).map_err(|e| e.to_string())?;
        let t = Instant::now();
        let chunks: Vec<&[u32]> = prompt.chunks(args.chunk.max(1)).collect();
        let mut logits = Vec::new();
        for (i, part) in chunks.iter().enumerate() {
            let want = if i + 1 == chunks.len() { Logits::Last } else { Logits::None };
            logits = step(&mut e, StepItem::prefill(1, part, want))?;
        }
        let prefill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..args.decode {
            let next = yoco_worker::sampling::argmax(&logits);
            logits = step(&mut e, StepItem::decode(1, &[next]))?;
        }
        let decode = args.decode as f64 / t.elapsed().as_secs_f64();
        let cache_mb = (e.sequence_len(1).unwrap_or(0) * bytes_per_token) as f64 / 1e6;
        let mem = memory(e.backend()).map_or("—".to_string(), |g| format!("{g:.1}"));
        println!("| {n} | {prefill:.2} | {:.0} | {decode:.1} | {cache_mb:.1} | {mem} |", n as f64 / prefill);
        e.free_sequence(1);
    }
    Ok(())
}

fn main() {
    if let Err(e) = main_result() {
        eprintln!("backend_bench: {e}");
        std::process::exit(1);
    }
}

fn main_result() -> Result<(), String> {
    let args = parse()?;
    let preset = Preset::parse(&args.preset).ok_or(format!("unknown preset {}", args.preset))?;
    let store = StoreDtype::parse(&args.dtype).ok_or(format!("unknown dtype {}", args.dtype))?;
    let dir = args
        .model
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("yoco-bench-{}-{}", args.preset, args.dtype)));
    if !dir.join("model.safetensors").exists() {
        let t = Instant::now();
        write_random_model(&preset.config(), store, 1, false, &dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        println!(
            "# wrote a random {} {} model to {} in {:.1} s",
            args.preset,
            args.dtype,
            dir.display(),
            t.elapsed().as_secs_f64()
        );
    }
    let model = Model::load(&dir).map_err(|e| e.to_string())?;
    match args.device.as_str() {
        "cpu" => run(yoco_worker::backend::cpu::CpuBackend::default(), &model, &args, &|_| None),
        #[cfg(feature = "cuda")]
        "cuda" => {
            let gpu = yoco_worker::cuda::driver::CudaBackend::open(0).map_err(|e| e.to_string())?;
            let info = gpu.runtime().info().clone();
            println!("# GPU {}: {} (compute {}.{})", info.ordinal, info.name, info.capability.0, info.capability.1);
            run(gpu, &model, &args, &|g: &yoco_worker::cuda::driver::CudaBackend| {
                g.memory().ok().map(|(free, total)| (total - free) as f64 / 1e9)
            })
        }
        other => Err(format!(
            "device {other}: this build has {}",
            if cfg!(feature = "cuda") { "cpu and cuda" } else { "cpu only (build with --features cuda)" }
        )),
    }
}
