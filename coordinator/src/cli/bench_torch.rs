//! `yoco bench --torch PYTHON`: yoco's prefill and decode in f32 and bf16 compute beside
//! PyTorch eager's in f32 and bf16 (`tools/bench/torch_yoco.py`, run by that interpreter) on the
//! same model directory, the same prompts and the same thread count, in one run. The four take
//! turns, round after round, and each keeps its best round per length: on a shared machine a slow
//! spell would otherwise fall on one of them only. The greedy token after each prompt is
//! compared between yoco f32 and PyTorch f32, so a table can only be printed for one model.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::json;
use yoco_worker::engine::{Engine, EngineOptions, Logits, StepItem};
use yoco_worker::model::Model;
use yoco_worker::sampling::argmax;
use yoco_worker::weights::{ComputeDtype, WeightDtype};

/// What the comparison runs and where.
pub struct Options<'a> {
    pub python: &'a Path,
    pub script: &'a Path,
    pub model_dir: &'a Path,
    pub lengths: &'a [usize],
    pub decode_tokens: usize,
    pub prefill_chunk: usize,
    pub rounds: usize,
    pub threads: usize,
    pub cache_bytes_per_token: usize,
}

/// The default `--torch-script`: the repository's, next to this crate.
pub fn default_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/bench/torch_yoco.py")
}

/// One of the four: who ran and in which type.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Runner {
    Yoco(ComputeDtype),
    Torch(&'static str),
}

impl Runner {
    const ALL: [Runner; 4] = [
        Runner::Yoco(ComputeDtype::F32),
        Runner::Yoco(ComputeDtype::Bf16),
        Runner::Torch("f32"),
        Runner::Torch("bf16"),
    ];

    fn name(self) -> String {
        match self {
            Runner::Yoco(c) => format!("yoco {}", c.name()),
            Runner::Torch(d) => format!("torch {d}"),
        }
    }
}

/// One run at one length.
#[derive(Clone, Copy, Debug, Deserialize)]
struct Run {
    context: usize,
    prefill_seconds: f64,
    decode_tokens_per_second: f64,
    greedy_token: u32,
    greedy_logit: f32,
}

#[derive(Deserialize)]
struct TorchOut {
    torch: String,
    threads: usize,
    chunk: usize,
    runs: Vec<Run>,
}

/// The table's rows: per runner, per length, its best prefill and best decode.
pub struct Comparison {
    torch_version: String,
    torch_chunk: usize,
    rows: Vec<(Runner, Vec<Run>)>,
    /// What yoco's bf16 runs computed in (f32 where the CPU has neither AMX nor AVX512_BF16).
    yoco_bf16_ran: &'static str,
}

pub fn run(o: &Options) -> anyhow::Result<Comparison> {
    if !o.script.is_file() {
        bail!("--torch-script {}: no such file", o.script.display());
    }
    let models = [
        Arc::new(Model::load_as(o.model_dir, WeightDtype::F32)?),
        Arc::new(Model::load_as(o.model_dir, WeightDtype::Bf16)?),
    ];
    let mut best: Vec<(Runner, Vec<Option<Run>>)> =
        Runner::ALL.iter().map(|&r| (r, vec![None; o.lengths.len()])).collect();
    let (mut torch_version, mut torch_chunk) = (String::new(), 0);
    let mut yoco_bf16_ran = "bf16";
    for round in 0..o.rounds.max(1) {
        for (runner, slots) in &mut best {
            let runs = match *runner {
                Runner::Yoco(compute) => {
                    let model = &models[usize::from(compute == ComputeDtype::Bf16)];
                    let mut runs = Vec::new();
                    for &n in o.lengths {
                        let (run, ran) = yoco_run(model, compute, n, o)?;
                        if compute == ComputeDtype::Bf16 {
                            yoco_bf16_ran = ran;
                        }
                        runs.push(run);
                    }
                    runs
                }
                Runner::Torch(dtype) => {
                    let out = torch_run(o, dtype)?;
                    (torch_version, torch_chunk) = (out.torch, out.chunk);
                    if out.threads != o.threads {
                        tracing::warn!(torch = out.threads, yoco = o.threads, "PyTorch ran another thread count");
                    }
                    out.runs
                }
            };
            for (slot, run) in slots.iter_mut().zip(runs) {
                let b = slot.get_or_insert(run);
                b.prefill_seconds = b.prefill_seconds.min(run.prefill_seconds);
                b.decode_tokens_per_second = b.decode_tokens_per_second.max(run.decode_tokens_per_second);
            }
            eprintln!("yoco bench --torch: round {} of {}: {} done", round + 1, o.rounds.max(1), runner.name());
        }
    }
    let rows = best
        .into_iter()
        .map(|(r, runs)| (r, runs.into_iter().map(|x| x.expect("every length ran")).collect()))
        .collect();
    Ok(Comparison { torch_version, torch_chunk, rows, yoco_bf16_ran })
}

/// Prefill `n` tokens in `--prefill-chunk` steps, then greedy decode, as the main table does.
fn yoco_run(model: &Arc<Model>, compute: ComputeDtype, n: usize, o: &Options) -> anyhow::Result<(Run, &'static str)> {
    let opts = EngineOptions {
        cache_budget_bytes: (n + o.decode_tokens + 512) * o.cache_bytes_per_token * 2,
        compute_dtype: compute,
        ..Default::default()
    };
    let mut engine = Engine::new(model.clone(), &opts);
    engine.add_sequence(1)?;
    let prompt = super::bench::prompt(n);
    let started = Instant::now();
    let mut last = Vec::new();
    let chunks = n.div_ceil(o.prefill_chunk);
    for (i, part) in prompt.chunks(o.prefill_chunk).enumerate() {
        let want = if i + 1 == chunks { Logits::Last } else { Logits::None };
        last = engine.step(&[StepItem::prefill(1, part, want)])?.remove(0).logits.into_vec();
    }
    let prefill_seconds = started.elapsed().as_secs_f64();
    let greedy_token = argmax(&last);
    let greedy_logit = last[greedy_token as usize];
    let mut token = greedy_token;
    let started = Instant::now();
    for _ in 0..o.decode_tokens {
        token = argmax(&engine.step(&[StepItem::decode(1, &[token])])?.remove(0).logits);
    }
    let decode_tokens_per_second = o.decode_tokens as f64 / started.elapsed().as_secs_f64();
    let ran = yoco_worker::backend::Backend::compute_name(engine.backend());
    Ok((Run { context: n, prefill_seconds, decode_tokens_per_second, greedy_token, greedy_logit }, ran))
}

/// One PyTorch process for one dtype over every length (it warms up first).
fn torch_run(o: &Options, dtype: &str) -> anyhow::Result<TorchOut> {
    let lengths: Vec<String> = o.lengths.iter().map(|n| n.to_string()).collect();
    let out = Command::new(o.python)
        .arg(o.script)
        .arg(o.model_dir)
        .args(["--lengths", &lengths.join(","), "--dtypes", dtype])
        .args(["--decode-tokens", &o.decode_tokens.to_string(), "--threads", &o.threads.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {} {}", o.python.display(), o.script.display()))?;
    if !out.status.success() {
        bail!("{} exited with {}", o.script.display(), out.status);
    }
    let parsed: TorchOut = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{}: output is not the expected JSON", o.script.display()))?;
    if parsed.runs.len() != o.lengths.len() || parsed.runs.iter().zip(o.lengths).any(|(r, &n)| r.context != n) {
        bail!("{}: runs for other lengths than asked", o.script.display());
    }
    Ok(parsed)
}

impl Comparison {
    fn get(&self, runner: Runner) -> &[Run] {
        &self.rows.iter().find(|(r, _)| *r == runner).expect("all four ran").1
    }

    pub fn print(&self, lengths: &[usize], rounds: usize, threads: usize) {
        println!(
            "against PyTorch eager (torch {}, {threads} threads, chunkwise retention in blocks of {}; yoco bf16 computed in {}), best of {rounds} alternated rounds:",
            self.torch_version, self.torch_chunk, self.yoco_bf16_ran
        );
        print!("{:>22}", "");
        for n in lengths {
            print!(" {:>13}", format!("prefill {n}"));
        }
        for n in lengths {
            print!(" {:>12}", format!("decode @{n}"));
        }
        println!();
        for (runner, runs) in &self.rows {
            print!("{:>22}", format!("{} tok/s", runner.name()));
            for r in runs {
                print!(" {:>13.0}", r.context as f64 / r.prefill_seconds);
            }
            for r in runs {
                print!(" {:>12.1}", r.decode_tokens_per_second);
            }
            println!();
        }
        for (a, b) in [("bf16", "bf16"), ("f32", "f32")] {
            let yoco = self.get(Runner::Yoco(a.parse().expect("a compute type")));
            let torch = self.get(Runner::Torch(b));
            print!("{:>22}", format!("yoco {a} / torch {b}"));
            for (y, t) in yoco.iter().zip(torch) {
                print!(" {:>12.2}x", t.prefill_seconds / y.prefill_seconds);
            }
            for (y, t) in yoco.iter().zip(torch) {
                print!(" {:>11.2}x", y.decode_tokens_per_second / t.decode_tokens_per_second);
            }
            println!();
        }
        for (y, t) in self.get(Runner::Yoco(ComputeDtype::F32)).iter().zip(self.get(Runner::Torch("f32"))) {
            println!(
                "  greedy token after {} tokens: yoco f32 {} (logit {:.4}), torch f32 {} (logit {:.4}){}",
                y.context,
                y.greedy_token,
                y.greedy_logit,
                t.greedy_token,
                t.greedy_logit,
                if y.greedy_token == t.greedy_token { "" } else { "  <- differ" }
            );
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "torch": self.torch_version, "torch_retention_chunk": self.torch_chunk,
            "yoco_bf16_computed_in": self.yoco_bf16_ran,
            "runs": self.rows.iter().flat_map(|(runner, runs)| runs.iter().map(move |r| json!({
                "runner": runner.name(), "context": r.context, "prefill_seconds": r.prefill_seconds,
                "prefill_tokens_per_second": r.context as f64 / r.prefill_seconds,
                "decode_tokens_per_second": r.decode_tokens_per_second,
                "greedy_token": r.greedy_token, "greedy_logit": r.greedy_logit,
            }))).collect::<Vec<_>>(),
        })
    }
}
