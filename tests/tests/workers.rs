//! `yoco generate --workers P`: P real worker processes on loopback, context-parallel prefill and
//! a position-sharded cache, must print what one process prints; a worker killed mid-prefill or
//! mid-decode ends the request with an error naming the lost rank, in bounded time.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use yoco_e2e::{yoco, yoco_bin};

fn init_model(home: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let dir = home.join(name);
    let mut args = vec!["init-model", "--preset", "tiny", "--out", dir.to_str().unwrap()];
    args.extend_from_slice(if extra.contains(&"--vocab-size") { &[] } else { &["--vocab-size", "2000"] });
    args.extend_from_slice(extra);
    yoco(home, &args).ok();
    dir
}

fn prompt_ids(n: usize) -> String {
    (0..n).map(|i| ((i * 37 + 11) % 2000).to_string()).collect::<Vec<_>>().join(",")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect()
}

#[test]
fn one_to_four_workers_print_what_one_process_prints() {
    let home = tempfile::tempdir().unwrap();
    for (name, extra) in [("gret", vec![]), ("swa", vec!["--sliding-window", "8"])] {
        let model = init_model(home.path(), name, &extra);
        let ids = prompt_ids(301);
        // 37 tokens per rank per step: several steps, chunks shorter and longer than the window.
        let base =
            ["generate", "--model", model.to_str().unwrap(), "--prompt-ids", &ids, "--max-tokens", "6", "--json"];
        let run = |more: &[&str]| {
            let mut args = base.to_vec();
            args.extend_from_slice(&[
                "--prefill-chunk",
                "37",
                "--temperature",
                "0.7",
                "--seed",
                "5",
                "--prompt-logprobs",
            ]);
            args.extend_from_slice(more);
            yoco(home.path(), &args).ok().json()
        };
        let single = run(&[]);
        for p in 1..=4 {
            let workers = p.to_string();
            let out = run(&["--workers", &workers]);
            assert_eq!(out["workers"], p);
            assert_eq!(out["tokens"], single["tokens"], "{name} P={p}");
            for key in ["logprobs", "prompt_logprobs"] {
                let (a, b) = (floats(&out[key]), floats(&single[key]));
                assert_eq!(a.len(), b.len());
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        x.is_nan() && y.is_nan() || (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                        "{name} P={p} {key}: {x} vs {y}"
                    );
                }
            }
            let per_rank: Vec<u64> =
                out["cache"]["per_rank"].as_array().unwrap().iter().map(|r| r["tokens"].as_u64().unwrap()).collect();
            assert_eq!(per_rank.len(), p);
            // Every prompt token and every generated token but the last is in exactly one shard.
            assert_eq!(per_rank.iter().sum::<u64>(), 301 + 5, "{name} P={p}: {per_rank:?}");
            let (lo, hi) = (per_rank.iter().min().unwrap(), per_rank.iter().max().unwrap());
            // Steps of 37·P tokens cut evenly, decode tokens to the smallest shard.
            assert!(hi - lo <= 37, "{name} P={p}: unbalanced {per_rank:?}");
        }
    }
}

/// Child process ids of `pid`, from /proc (field 4 of /proc/<pid>/stat is the parent).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // The command name (field 2) is in parentheses and may contain spaces.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        if after.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// Starts `yoco generate --workers 2`, sends `signal` (`KILL`, or `STOP` for a rank that stalls)
/// to rank `victim` after `after`, returns (stderr, seconds from the signal to the exit, exit
/// success).
fn signal_a_worker(
    home: &Path,
    model: &Path,
    args: &[&str],
    victim: usize,
    after: Duration,
    signal: &str,
) -> (String, f64, bool) {
    let mut cmd = Command::new(yoco_bin());
    cmd.args(["generate", "--model", model.to_str().unwrap(), "--workers", "2"])
        .args(args)
        .env("YOCO_HOME", home)
        .env("RUST_LOG", "warn")
        .env("RUST_LIB_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let started = Instant::now();
    let workers = loop {
        let c = children(child.id());
        if c.len() == 2 || started.elapsed() > Duration::from_secs(30) {
            break c;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(workers.len(), 2, "workers did not start");
    std::thread::sleep(after);
    let killed = Instant::now();
    // The shell's builtin kill: no procps needed.
    Command::new("sh").args(["-c", &format!("kill -{signal} {}", workers[victim])]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    // A stopped worker outlives its parent's kill-on-exit only until this.
    Command::new("sh").args(["-c", &format!("kill -9 {} 2>/dev/null", workers[victim])]).status().unwrap();
    (String::from_utf8_lossy(&out.stderr).into_owned(), killed.elapsed().as_secs_f64(), out.status.success())
}

/// A rank that stops answering (SIGSTOP: alive, silent) is found by its peers' collective
/// timeout; the step fails then, without waiting for the silent rank.
#[test]
fn a_stalled_worker_fails_the_request_in_bounded_time() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path(), "m", &[]);
    let args = ["--prompt-ids", "1,2,3", "--max-tokens", "1000000", "--ignore-eos", "--collective-timeout", "2"];
    let (stderr, secs, ok) = signal_a_worker(home.path(), &model, &args, 1, Duration::from_millis(1500), "STOP");
    assert!(!ok, "the request must fail when a worker stalls");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("rank 1"), "the error should name the stalled rank: {stderr}");
    assert!(secs < 2.0 + 4.0, "took {secs:.1}s after the stall (collective timeout 2 s)");
    eprintln!("stalled: failed {secs:.2}s after SIGSTOP: {}", stderr.lines().last().unwrap_or(""));
}

#[test]
fn a_killed_worker_fails_the_request_in_bounded_time() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path(), "m", &["--vocab-size", "100288"]);
    // Mid-prefill: a prompt long enough to take several seconds; mid-decode: a long generation.
    let long = home.path().join("long.txt");
    std::fs::write(&long, "the cat sat on the mat. ".repeat(60_000)).unwrap();
    let long = long.to_str().unwrap();
    let cases: [(&str, Vec<&str>, usize); 2] = [
        ("prefill", vec!["--prompt-file", long, "--max-tokens", "1", "--prefill-chunk", "2048"], 1),
        ("decode", vec!["--prompt-ids", "1,2,3", "--max-tokens", "1000000", "--ignore-eos"], 0),
    ];
    for (phase, args, victim) in cases {
        let mut args = args;
        args.extend(["--collective-timeout", "10"]);
        let (stderr, secs, ok) =
            signal_a_worker(home.path(), &model, &args, victim, Duration::from_millis(2500), "KILL");
        assert!(!ok, "{phase}: the request must fail when a worker dies");
        assert!(!stderr.contains("panicked"), "{phase}: {stderr}");
        assert!(
            stderr.contains(&format!("rank {}", 1 - victim)) || stderr.contains(&format!("rank {victim}")),
            "{phase}: {stderr}"
        );
        assert!(secs < 10.0, "{phase}: took {secs:.1}s after the kill");
        eprintln!("{phase}: failed {secs:.2}s after the kill: {}", stderr.lines().last().unwrap_or(""));
    }
}

/// Asking for NCCL where it cannot work (no `cuda` feature, or no GPU) or for an unknown
/// transport is a clear error from the group, not a hang or a panic.
#[test]
fn an_unavailable_transport_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path(), "m", &[]);
    let base = ["generate", "--model", model.to_str().unwrap(), "--prompt-ids", "1,2", "--workers", "2"];
    for (transport, expect) in [("nccl", "NCCL"), ("carrier-pigeon", "carrier-pigeon")] {
        let mut args = base.to_vec();
        args.extend_from_slice(&["--transport", transport, "--collective-timeout", "10"]);
        let run = yoco(home.path(), &args).fails_with(&[expect]);
        // Every rank refuses it; the first refusal ends the formation and names its rank.
        assert!(run.stderr().contains("rank 0") || run.stderr().contains("rank 1"), "{}", run.stderr());
    }
}

/// NCCL as its wheel and Debian packages ship it (`libnccl.so.2`, no `libnccl.so`) is linked
/// under the name cudarc opens: a stand-in library of that name on `LD_LIBRARY_PATH` is found,
/// linked and loaded by a `yoco` built with CUDA (a build without it has no NCCL to load).
#[test]
fn nccl_as_shipped_is_linked_under_the_name_cudarc_opens() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path(), "m", &[]);
    let probe =
        yoco(home.path(), &["generate", "--model", model.to_str().unwrap(), "--device", "cuda", "--prompt-ids", "1"]);
    if probe.stderr().contains("without the `cuda` feature") {
        eprintln!("skipped: this yoco was built without the `cuda` feature");
        return;
    }
    let lib = home.path().join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    let src = home.path().join("nccl.c");
    std::fs::write(&src, "int ncclGetVersion(int *v) { *v = 22703; return 0; }\n").unwrap();
    let cc = Command::new("cc")
        .args(["-shared", "-fPIC", "-Wl,-soname,libnccl.so.2", "-o"])
        .arg(lib.join("libnccl.so.2"))
        .arg(&src)
        .status()
        .expect("a C compiler (Rust links with it)");
    assert!(cc.success());
    let out = Command::new(yoco_bin())
        .args(["init-model", "--preset", "tiny", "--vocab-size", "300", "--out"])
        .arg(home.path().join("m2"))
        .env("LD_LIBRARY_PATH", &lib)
        .env("RUST_LOG", "info")
        .env("TMPDIR", home.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("linked as libnccl.so"), "{stderr}");
    let link = std::fs::read_dir(home.path())
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("yoco-nccl-"));
    let link = link.expect("the link's folder").path().join("libnccl.so");
    assert_eq!(std::fs::canonicalize(link).unwrap(), std::fs::canonicalize(lib.join("libnccl.so.2")).unwrap());
}
