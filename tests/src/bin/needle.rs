//! Passkey retrieval served by yoco: `cargo run --release -p yoco-e2e --bin needle -- --lengths
//! 1K,4K,16K,64K,256K,1M --trials 8` (build `yoco` first: `cargo build --release -p yoco`). It
//! starts `yoco serve --workers 2` on the built-in default model (or `--model DIR`), hides a
//! random 5-digit pass key at evenly spread depths of the classic filler ("The grass is green.
//! The sky is blue. ..."), asks for it at the end, and counts the greedy answers that start with
//! the key. Prints a table and, with `--json`, one JSON line.

use std::time::Instant;

use yoco_e2e::server::{generate, Server};
use yoco_proto::v1 as pb;

const USAGE: &str = "usage: needle [--lengths 1K,4K,... (default 1K,4K,16K,64K)] [--trials N (default 8)] \
    [--workers N (default 2)] [--model DIR] [--seed N] [--json]";

/// The filler and question of `tools/train/train.py` (and `evaluate.py`'s `passkey_prompt`).
const FILLER: &str = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
const QUESTION: &str = "What is the pass key? The pass key is";

struct Row {
    target: usize,
    prompt_tokens: u64,
    hits: usize,
    trials: usize,
    prefill_s: f64,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut lengths, mut trials, mut workers, mut model, mut seed, mut json) =
        (vec![1 << 10, 4 << 10, 16 << 10, 64 << 10], 8usize, 2usize, None::<String>, 1u64, false);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().unwrap_or_else(|| fail(&format!("{name} needs a value")));
        match a.as_str() {
            "--lengths" => {
                lengths = value("--lengths").split(',').map(|s| parse_len(s).unwrap_or_else(|| fail(s))).collect()
            }
            "--trials" => trials = value("--trials").parse().unwrap_or_else(|_| fail("--trials")),
            "--workers" => workers = value("--workers").parse().unwrap_or_else(|_| fail("--workers")),
            "--model" => model = Some(value("--model")),
            "--seed" => seed = value("--seed").parse().unwrap_or_else(|_| fail("--seed")),
            "--json" => json = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => fail(&format!("unknown argument {other}")),
        }
    }
    if trials == 0 || workers == 0 || lengths.is_empty() {
        fail("--trials, --workers and --lengths must not be zero or empty");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let rows = rt.block_on(run(&lengths, trials, workers, model, seed));
    println!("| context (tokens) | prompt tokens | accuracy | prefill s/trial |");
    println!("|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {}/{} ({:.0}%) | {:.1} |",
            fmt_len(r.target),
            r.prompt_tokens,
            r.hits,
            r.trials,
            100.0 * r.hits as f64 / r.trials as f64,
            r.prefill_s
        );
    }
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({"target": r.target, "prompt_tokens": r.prompt_tokens, "hits": r.hits,
                    "trials": r.trials, "prefill_s_per_trial": r.prefill_s})
            })
            .collect();
        println!("{}", serde_json::json!({ "workers": workers, "rows": v }));
    }
}

async fn run(lengths: &[usize], trials: usize, workers: usize, model: Option<String>, seed: u64) -> Vec<Row> {
    let home = tempfile::tempdir().unwrap();
    let longest = *lengths.iter().max().unwrap();
    // 1 KiB of cache per token for the default model, split over the ranks, with room to spare.
    let cache_mib = ((longest * 2048 / workers) >> 20).max(256).to_string();
    let workers_arg = workers.to_string();
    let mut args = vec!["serve", "--workers", &workers_arg, "--cache-mib", &cache_mib];
    if let Some(m) = &model {
        args.extend_from_slice(&["--model", m]);
    }
    let server = Server::start(home.path(), &args).await;
    let mut client = server.client().await;
    let count = |text: String| {
        let mut c = client.clone();
        async move { c.tokenize(pb::TokenizeRequest { text }).await.expect("tokenize").into_inner().ids.len() }
    };
    let per_filler = (count(FILLER.repeat(64)).await as f64 / 64.0).max(1.0);
    let overhead = count(needle("00000") + QUESTION).await as f64;
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rows = Vec::new();
    for &target in lengths {
        let reps = ((target as f64 - overhead) / per_filler).floor().max(1.0) as usize;
        let mut row = Row { target, prompt_tokens: 0, hits: 0, trials, prefill_s: 0.0 };
        for t in 0..trials {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let key = format!("{:05}", rng % 100_000);
            let depth = (reps as f64 * (t as f64 + 0.5) / trials as f64) as usize;
            let prompt = format!("{}{}{}{QUESTION}", FILLER.repeat(depth), needle(&key), FILLER.repeat(reps - depth));
            let req = pb::GenerateRequest {
                prompt: Some(pb::generate_request::Prompt::Text(prompt)),
                max_tokens: Some(6),
                ignore_eos: true,
                ..Default::default()
            };
            let started = Instant::now();
            let out = generate(&mut client, req).await.expect("generate");
            if let Some(s) = &out.status {
                panic!("request failed: {s:?}\n{}", server.stderr());
            }
            let elapsed = out.first_token.map_or(started.elapsed(), |f| f - started).as_secs_f64();
            row.prefill_s += elapsed / trials as f64;
            row.prompt_tokens = out.finished.as_ref().and_then(|f| f.usage.as_ref()).map_or(0, |u| u.prompt_tokens);
            let hit = out.text.trim_start().starts_with(&key);
            row.hits += usize::from(hit);
            eprintln!(
                "{}: trial {t} depth {:.2} key {key} -> {:?} {} ({elapsed:.1} s)",
                fmt_len(target),
                depth as f64 / reps as f64,
                out.text,
                if hit { "ok" } else { "MISS" }
            );
        }
        rows.push(row);
    }
    rows
}

fn needle(key: &str) -> String {
    format!("The pass key is {key}. Remember it. {key} is the pass key. ")
}

fn parse_len(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    num.parse::<usize>().ok().filter(|&n| n > 0).map(|n| n * mult)
}

fn fmt_len(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}M", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{}K", n >> 10)
    } else {
        n.to_string()
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("needle: {msg}\n{USAGE}");
    std::process::exit(2);
}
