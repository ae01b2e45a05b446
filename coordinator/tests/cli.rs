//! The `yoco` command line, run as a real process: `init-model`, `generate` (JSON output,
//! seeds, prompt log-probabilities, sliding-window models, the built-in default model) and
//! clean failures on bad input.
//!
//! It is an integration test of the `yoco` package, so `cargo test` builds the `yoco` binary
//! first, with the features of the whole test build; the end-to-end tests of `yoco-e2e` then run
//! that same binary.

use std::path::{Path, PathBuf};

use serde_json::Value;
use yoco_e2e::yoco;

/// A tiny model with a 1000-token vocabulary in `home/name`.
fn init_model(home: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let dir = home.join(name);
    let out = dir.to_str().unwrap();
    let mut args = vec!["init-model", "--preset", "tiny", "--vocab-size", "1000"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--out", out]);
    let run = yoco(home, &args).ok();
    assert!(run.stderr().contains("wrote tiny"), "{}", run.stderr());
    dir
}

fn generate_json(home: &Path, model: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    yoco(home, &args).ok().json()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|t| t.as_u64().unwrap()).collect()
}

fn numbers(v: &Value) -> Vec<f64> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|t| t.as_f64().unwrap()).collect()
}

#[test]
fn generate_json_has_the_documented_fields() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path(), "m", &[]);
    for file in ["params.json", "model.safetensors"] {
        assert!(model.join(file).is_file(), "{file}");
    }
    let out = generate_json(home.path(), &model, &["--prompt-ids", "1,2,3", "--max-tokens", "5"]);
    assert_eq!(ids(&out["prompt_tokens"]), [1, 2, 3]);
    let tokens = ids(&out["tokens"]);
    // The vocabulary (1000) cannot produce cl100k's end-of-text token, so all 5 come.
    assert_eq!(tokens.len(), 5, "{out}");
    assert!(tokens.iter().all(|&t| t < 1000));
    assert_eq!(out["finish_reason"], "length");
    let logprobs = numbers(&out["logprobs"]);
    assert_eq!(logprobs.len(), 5);
    assert!(logprobs.iter().all(|&lp| lp <= 0.0 && lp.is_finite()));
    assert!(out["top_logprobs"].is_null(), "not asked for: {out}");
    assert!(out["prompt_logprobs"].is_null(), "not asked for: {out}");
    assert!(out["text"].is_string());
    assert!(out["seed"].is_u64());
    // `--device auto` (the default) on a machine without a GPU runs on the CPU, and says so.
    assert_eq!(out["device"], "cpu");
    assert_eq!(out["usage"]["prompt_tokens"], 3);
    assert_eq!(out["usage"]["completion_tokens"], 5);
    assert_eq!(out["usage"]["total_tokens"], 8);
    for key in ["prefill_seconds", "prefill_tokens_per_second", "decode_seconds", "decode_tokens_per_second"] {
        assert!(out["timing"][key].as_f64().unwrap() >= 0.0, "{key}: {out}");
    }
    assert_eq!(out["tokenizer"], "tiktoken:cl100k_base");
    assert!(out["cache"]["bytes_per_token"].as_u64().unwrap() > 0);

    // Greedy (the default) is deterministic whatever the seed, and --logprobs K lists the K
    // most likely tokens, the chosen one first.
    let top = generate_json(home.path(), &model, &["--prompt-ids", "1,2,3", "--max-tokens", "5", "--logprobs", "4"]);
    assert_eq!(ids(&top["tokens"]), tokens);
    let steps = top["top_logprobs"].as_array().unwrap();
    assert_eq!(steps.len(), 5);
    for (i, step) in steps.iter().enumerate() {
        let alts = step.as_array().unwrap();
        assert_eq!(alts.len(), 4);
        assert_eq!(alts[0]["token"].as_u64(), Some(tokens[i]));
        assert_eq!(alts[0]["logprob"].as_f64(), Some(logprobs[i]));
        let lps: Vec<f64> = alts.iter().map(|a| a["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]), "{step}");
    }

    // Plain text output: the text on stdout, a summary on stderr.
    let m = model.to_str().unwrap();
    let run = yoco(home.path(), &["generate", "--model", m, "--prompt-ids", "1,2,3", "--max-tokens", "5"]).ok();
    assert_eq!(run.stdout().trim_end_matches('\n'), out["text"].as_str().unwrap());
    assert!(run.stderr().contains("3 prompt tokens, 5 generated"), "{}", run.stderr());
}

#[test]
fn same_seed_same_tokens_other_seed_other_tokens() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path(), "m", &[]);
    let sample = |seed: &str| {
        let out = generate_json(
            home.path(),
            &model,
            &["--prompt-ids", "5,6,7,8", "--max-tokens", "10", "--temperature", "0.8", "--seed", seed],
        );
        assert_eq!(out["seed"].as_u64().unwrap().to_string(), seed);
        ids(&out["tokens"])
    };
    let first = sample("1234");
    assert_eq!(first.len(), 10);
    assert_eq!(sample("1234"), first);
    assert_ne!(sample("1235"), first);
}

#[test]
fn prompt_logprobs_are_null_then_numbers() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path(), "m", &[]);
    let out =
        generate_json(home.path(), &model, &["--prompt-ids", "10,20,30,40", "--max-tokens", "2", "--prompt-logprobs"]);
    let lps = out["prompt_logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), 4);
    assert!(lps[0].is_null());
    for lp in &lps[1..] {
        let lp = lp.as_f64().unwrap_or_else(|| panic!("not a number: {out}"));
        assert!(lp <= 0.0 && lp.is_finite());
    }
}

#[test]
fn sliding_window_models_work() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path(), "swa", &["--sliding-window", "8"]);
    let params: Value = serde_json::from_str(&std::fs::read_to_string(model.join("params.json")).unwrap()).unwrap();
    assert_eq!(params["sliding_window"], 8);
    // A prompt longer than the window, prefilled whole and in chunks of 3.
    let prompt: Vec<String> = (0..20).map(|i| (i * 37 % 1000).to_string()).collect();
    let prompt = prompt.join(",");
    let base = ["--prompt-ids", prompt.as_str(), "--max-tokens", "6"];
    let whole = generate_json(home.path(), &model, &base);
    assert_eq!(ids(&whole["tokens"]).len(), 6);
    let mut chunked_args = base.to_vec();
    chunked_args.extend_from_slice(&["--prefill-chunk", "3"]);
    let chunked = generate_json(home.path(), &model, &chunked_args);
    assert_eq!(chunked["tokens"], whole["tokens"]);
    let mut logprob_args = base.to_vec();
    logprob_args.push("--prompt-logprobs");
    let with_logprobs = generate_json(home.path(), &model, &logprob_args);
    assert_eq!(with_logprobs["tokens"], whole["tokens"]);
    assert_eq!(with_logprobs["prompt_logprobs"].as_array().unwrap().len(), 20);
}

#[test]
fn default_model_is_created_under_yoco_home() {
    let home = tempfile::tempdir().unwrap();
    // The fixture PyTorch's reference wrote for this model (tools/train/evaluate.py).
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/default_model.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let c = &fixture["continuations"][0];
    let want = ids(&c["greedy_ids"]);
    let n = want.len().to_string();
    let args = ["generate", "--prompt", c["prompt"].as_str().unwrap(), "--max-tokens", &n, "--ignore-eos", "--json"];
    let first = yoco(home.path(), &args).ok().json();
    let entries: Vec<_> = std::fs::read_dir(home.path().join("models"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    // One directory, named by the model's hash; nothing half-written beside it.
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(entries[0].starts_with("yoco-tiny-text-"), "{entries:?}");
    let dir = home.path().join("models").join(&entries[0]);
    assert_eq!(first["model"], dir.display().to_string());
    for file in ["params.json", "model.safetensors", "tokenizer.json", "training.json"] {
        assert!(dir.join(file).is_file(), "{file}");
    }
    // The trained tokenizer and the single-process engine: PyTorch's greedy tokens.
    assert_eq!(ids(&first["prompt_tokens"]), ids(&c["prompt_ids"]));
    assert_eq!(ids(&first["tokens"]), want, "{first}");
    // A second run reuses the directory.
    let second = yoco(home.path(), &args).ok().json();
    assert_eq!(second["tokens"], first["tokens"]);
    assert_eq!(std::fs::read_dir(home.path().join("models")).unwrap().count(), 1);

    // `init-model --preset default` writes the same files.
    let out = home.path().join("copy");
    yoco(home.path(), &["init-model", "--preset", "default", "--out", out.to_str().unwrap()]).ok();
    for file in ["params.json", "model.safetensors", "tokenizer.json"] {
        assert_eq!(std::fs::read(out.join(file)).unwrap(), std::fs::read(dir.join(file)).unwrap(), "{file}");
    }
}

#[test]
fn half_precision_caches_and_weights_on_two_worker_processes() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path(), "m", &[]);
    let prompt: Vec<String> = yoco_e2e::prompt_ids(300, 1, 1000).iter().map(u32::to_string).collect();
    let prompt = prompt.join(",");
    let run = |flag: &str, dtype: &str| {
        let args = ["--prompt-ids", &prompt, "--max-tokens", "4", "--prompt-logprobs", flag, dtype];
        let mut args = args.to_vec();
        args.extend_from_slice(&["--workers", "2", "--prefill-chunk", "64"]);
        generate_json(home.path(), &model, &args)
    };
    let full = run("--cache-dtype", "f32");
    let lp = |v: &Value| -> Vec<f64> {
        v["prompt_logprobs"].as_array().unwrap()[1..].iter().map(|x| x.as_f64().unwrap()).collect()
    };
    let worst = |v: &Value| lp(v).iter().zip(lp(&full)).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert_eq!(full["cache"]["dtype"], "f32");
    assert_eq!(full["weights"]["dtype"], "f32", "an f32 checkpoint stays f32 by default");
    let f32_bytes = full["cache"]["bytes_per_token"].as_u64().unwrap();
    let f32_weights = full["weights"]["bytes"].as_u64().unwrap() as f64;
    for dtype in ["bf16", "f16"] {
        let half = run("--cache-dtype", dtype);
        assert_eq!(half["cache"]["dtype"], dtype);
        assert_eq!(half["cache"]["bytes_per_token"].as_u64().unwrap() * 2, f32_bytes, "{dtype} halves the cache");
        // K and V rounded to 8 or 11 significant bits: the log-probabilities move, a little.
        let bound = if dtype == "bf16" { 5e-2 } else { 1e-2 };
        let w = worst(&half);
        assert!(w > 0.0 && w < bound, "{dtype} cache: largest |Δ logprob| {w} (bound {bound})");

        let half = run("--weight-dtype", dtype);
        assert_eq!(half["weights"]["dtype"], dtype);
        let bytes = half["weights"]["bytes"].as_u64().unwrap() as f64;
        assert!(bytes < 0.51 * f32_weights, "{dtype} weights: {bytes} bytes vs {f32_weights}");
        // Every matrix rounded; measured: bf16 3.8e-2, f16 4.3e-3.
        let bound = if dtype == "bf16" { 0.15 } else { 2e-2 };
        let w = worst(&half);
        eprintln!("{dtype} weights: largest |Δ logprob| {w}");
        assert!(w > 0.0 && w < bound, "{dtype} weights: largest |Δ logprob| {w} (bound {bound})");
    }
}

/// Tensor parallelism through real worker processes: 2×1 and 2×2 grids of the tiny preset
/// (its one KV head copied on both ranks of a row) give the in-process engine's tokens and
/// log-probabilities; a split the model does not allow fails before any worker starts.
#[test]
fn tensor_parallel_worker_groups_match_one_process() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path(), "m", &[]);
    let prompt: Vec<String> = yoco_e2e::prompt_ids(300, 2, 1000).iter().map(u32::to_string).collect();
    let prompt = prompt.join(",");
    let run = |extra: &[&str]| {
        let mut args = vec!["--prompt-ids", &prompt, "--max-tokens", "6", "--prompt-logprobs", "--prefill-chunk", "64"];
        args.extend_from_slice(extra);
        generate_json(home.path(), &model, &args)
    };
    let one = run(&[]);
    let close = |a: &Value, b: &Value, what: &str| {
        for (i, (x, y)) in numbers(a).iter().zip(numbers(b)).enumerate() {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{what} {i}: {x} vs {y}");
        }
    };
    for (workers, cp) in [("2", 1), ("4", 2)] {
        let grid = run(&["--workers", workers, "--tp", "2"]);
        let what = format!("2 × {cp}");
        assert_eq!(grid["workers"], cp, "{what}: the context-parallel ranks");
        assert_eq!(ids(&grid["tokens"]), ids(&one["tokens"]), "{what}");
        close(&grid["logprobs"], &one["logprobs"], &format!("{what} logprob"));
        let skip_first = |v: &Value| Value::from(v.as_array().unwrap()[1..].to_vec());
        close(&skip_first(&grid["prompt_logprobs"]), &skip_first(&one["prompt_logprobs"]), &format!("{what} prompt"));
        let shards: Vec<u64> =
            grid["cache"]["per_rank"].as_array().unwrap().iter().map(|r| r["tokens"].as_u64().unwrap()).collect();
        assert_eq!(shards.len(), cp, "{what}");
        assert_eq!(shards.iter().sum::<u64>(), 300 + 6 - 1, "{what}: every position in one shard");
    }
    let m = model.to_str().unwrap();
    yoco(home.path(), &["generate", "--model", m, "--prompt-ids", "1,2", "--workers", "3", "--tp", "3"])
        .fails_with(&["tensor parallelism over 3 ranks", "n_self_heads (4)"]);
    yoco(home.path(), &["generate", "--model", m, "--prompt-ids", "1,2", "--workers", "3", "--tp", "2"])
        .fails_with(&["--tp 2 must divide --workers 3"]);
    yoco(home.path(), &["serve", "--model", m, "--tp", "8"]).fails_with(&["n_self_heads (4)"]);
}

#[test]
fn bench_reports_every_section() {
    let home = tempfile::tempdir().unwrap();
    let args = [
        "bench",
        "--lengths",
        "512",
        "--decode-tokens",
        "2",
        "--batches",
        "1,2",
        "--batch-context",
        "256",
        "--process-context",
        "512",
        "--dtype-context",
        "600",
        "--json",
    ];
    let out = yoco(home.path(), &args).ok().json();
    assert!(out["gemm_gflops_2048"].as_f64().unwrap() > 0.0 && out["read_gbps"].as_f64().unwrap() > 0.0);
    assert_eq!(out["runs"][0]["context"], 512);
    assert!(out["runs"][0]["prefill_tokens_per_second"].as_f64().unwrap() > 0.0);
    // Batches 1 and 2, with an f32 and a bf16 cache (the default --batch-cache-dtypes).
    let batched: Vec<(u64, String)> = out["batched_decode"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["sequences"].as_u64().unwrap(), b["cache_dtype"].as_str().unwrap().to_string()))
        .collect();
    let want: Vec<(u64, String)> =
        [(1, "f32"), (2, "f32"), (1, "bf16"), (2, "bf16")].iter().map(|&(b, d)| (b, d.to_string())).collect();
    assert_eq!(batched, want, "{out}");
    let procs = out["process_prefill"].as_array().unwrap();
    assert_eq!((procs[0]["processes"].as_u64(), procs[1]["threads_each"].as_u64()), (Some(1), Some(1)), "{out}");
    // One process, then 1 × P and P × 1 grids: prefill and decode rates, collective time.
    let grids: Vec<(u64, u64)> = procs.iter().map(|p| (p["tp"].as_u64().unwrap(), p["cp"].as_u64().unwrap())).collect();
    assert_eq!((grids[0], grids[1].0, grids[2].1), ((1, 1), 1, 1), "{out}");
    assert!(grids[1].1 >= 2 && grids[2].0 == grids[1].1, "{out}");
    for p in procs {
        assert!(p["decode_tokens_per_second"].as_f64().unwrap() > 0.0, "{p}");
        assert_eq!(p["decode_collectives"]["steps"].as_u64(), Some(1), "{p}: 2 tokens, one decode step");
    }
    assert!(procs[2]["decode_collectives"]["tp_seconds"].as_f64().unwrap() > 0.0, "{out}");
    assert!(procs[1]["prefill_collectives"]["cp_seconds"].as_f64().unwrap() > 0.0, "{out}");
    let dtypes = out["cache_dtypes"].as_array().unwrap();
    let names: Vec<&str> = dtypes.iter().map(|d| d["dtype"].as_str().unwrap()).collect();
    assert_eq!(names, ["f32", "bf16", "f16"]);
    let bytes: Vec<u64> = dtypes.iter().map(|d| d["bytes_per_token"].as_u64().unwrap()).collect();
    assert_eq!((bytes[1] * 2, bytes[2] * 2), (bytes[0], bytes[0]));
    assert_eq!(dtypes[0]["max_abs_logprob_diff_vs_f32"], 0.0);
    for d in &dtypes[1..] {
        let diff = d["max_abs_logprob_diff_vs_f32"].as_f64().unwrap();
        assert!(diff > 0.0 && diff < 0.1, "{d}");
    }
    let weights = out["weight_dtypes"].as_array().unwrap();
    let names: Vec<&str> = weights.iter().map(|d| d["dtype"].as_str().unwrap()).collect();
    assert_eq!(names, ["f32", "bf16", "f16"]);
    let bytes: Vec<f64> = weights.iter().map(|d| d["weight_bytes"].as_f64().unwrap()).collect();
    assert!(bytes[1] < 0.51 * bytes[0] && bytes[1] == bytes[2], "{bytes:?}");
    // The built-in model is stored in bf16: widened to f32 or kept, the same numbers.
    assert_eq!(weights[1]["max_abs_logprob_diff_vs_f32"], 0.0);
    let diff = weights[2]["max_abs_logprob_diff_vs_f32"].as_f64().unwrap();
    assert!(diff > 0.0 && diff < 0.5, "{}", weights[2]);
}

#[test]
fn bad_input_fails_with_a_message_and_no_panic() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = init_model(h, "m", &[]);
    let m = model.to_str().unwrap();
    let gen = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", m];
        args.extend_from_slice(extra);
        yoco(h, &args)
    };
    gen(&["--prompt-ids", "1", "--temperature=-1"]).fails_with(&["temperature", "-1"]);
    gen(&["--prompt-ids", "1", "--top-p", "0"]).fails_with(&["top_p"]);
    gen(&["--prompt-ids", "1", "--min-p", "2"]).fails_with(&["min_p"]);
    gen(&["--prompt-ids", "1,1000"]).fails_with(&["1000", "vocabulary", "size 1000"]);
    gen(&["--prompt-ids", "1,x"]).fails_with(&["--prompt-ids", "x"]);
    gen(&["--prompt-ids", "1", "--max-tokens", "many"]).fails_with(&["--max-tokens", "many"]);
    gen(&["--prompt", ""]).fails_with(&["empty"]);
    gen(&[]).fails_with(&["--prompt"]);
    gen(&["--prompt-file", h.join("nope.txt").to_str().unwrap()]).fails_with(&["nope.txt"]);
    // A budget too small for one cache block.
    gen(&["--prompt-ids", "1,2", "--cache-mib", "0"]).fails_with(&["cache", "budget"]);
    gen(&["--prompt-ids", "1", "--cache-dtype", "f8"]).fails_with(&["--cache-dtype", "f8", "bf16"]);
    // Asking for CUDA explicitly where it cannot run is an error that says why: a build without
    // the feature says so, and one with it (CI builds with it) finds no driver on a machine
    // without a GPU. A worker group is a CPU engine.
    let cuda = gen(&["--prompt-ids", "1", "--device", "cuda"]).fails_with(&["--device cuda"]).stderr();
    assert!(cuda.contains("without the `cuda` feature") || cuda.contains("no NVIDIA driver"), "{cuda}");
    gen(&["--prompt-ids", "1", "--device", "cuda", "--workers", "2"]).fails_with(&["--device cuda", "--workers"]);
    gen(&["--prompt-ids", "1", "--device", "tpu"]).fails_with(&["--device", "tpu"]);

    // A model directory without params.json, and one that does not exist.
    let empty = h.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = empty.to_str().unwrap();
    yoco(h, &["generate", "--model", e, "--prompt-ids", "1"]).fails_with(&["params.json", e]);
    let missing = h.join("missing");
    yoco(h, &["generate", "--model", missing.to_str().unwrap(), "--prompt-ids", "1"])
        .fails_with(&["missing", "params.json"]);
    // params.json but no weights.
    std::fs::copy(model.join("params.json"), empty.join("params.json")).unwrap();
    yoco(h, &["generate", "--model", e, "--prompt-ids", "1"]).fails_with(&["safetensors", e]);

    let out = h.join("x");
    let o = out.to_str().unwrap();
    yoco(h, &["init-model", "--preset", "huge", "--out", o]).fails_with(&["preset", "huge"]);
    yoco(h, &["init-model", "--dtype", "f8", "--out", o]).fails_with(&["dtype", "f8"]);
    yoco(h, &["init-model", "--sliding-window", "0", "--out", o]).fails_with(&["--sliding-window"]);
    yoco(h, &["init-model", "--vocab-size", "0", "--out", o]).fails_with(&["vocab_size"]);
    yoco(h, &["init-model", "--rope-theta", "0.5", "--out", o]).fails_with(&["rope_theta"]);
    yoco(h, &["init-model", "--preset", "tiny"]).fails_with(&["--out"]);
    assert!(!out.exists(), "a failed init-model writes nothing");
    yoco(h, &["bench", "--preset", "huge"]).fails_with(&["preset", "huge"]);
    yoco(h, &["bench", "--cache-dtypes", "f32,f8"]).fails_with(&["--cache-dtypes", "f8"]);
    yoco(h, &["bench", "--batch-cache-dtypes", "f8"]).fails_with(&["--batch-cache-dtypes", "f8"]);
    yoco(h, &["frobnicate"]).fails_with(&["frobnicate"]);
}

#[test]
fn help_and_version() {
    let home = tempfile::tempdir().unwrap();
    let help = yoco(home.path(), &["--help"]).ok().stdout();
    for cmd in ["init-model", "generate", "bench"] {
        assert!(help.contains(cmd), "{help}");
    }
    let version = yoco(home.path(), &["--version"]).ok().stdout();
    assert!(version.starts_with("yoco "), "{version}");
}
