//! A bounded soak of a loopback cluster: `cargo run --release -p yoco-e2e --bin soak -- --seconds
//! 180 --clients 64` (build `yoco` first: `cargo build --release -p yoco`). It starts etcd, a
//! coordinator and two worker groups, loads them for the given time, kills and restarts a rank of
//! one group midway, prints a table of what it measured, and exits non-zero when a check failed.

use std::time::Duration;

use yoco_e2e::soak::{run, Config};

const USAGE: &str = "usage: soak [--seconds N (default 180, at least 30)] [--clients N (default 64)] \
    [--huge N (100K+-token prompts; default one per minute from 120 s)] [--seed N] \
    [--deadline SECONDS (default 180)] [--cache-mib N (per rank, default 512)] [--keep]";

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut seconds, mut clients) = (180, 64);
    let (mut huge, mut seed, mut deadline, mut cache_mib, mut keep) = (None, None, None, None, false);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> u64 {
            let v = args.next().unwrap_or_else(|| fail(&format!("{name} needs a value")));
            v.parse().unwrap_or_else(|_| fail(&format!("{name} {v}: not a number")))
        };
        match a.as_str() {
            "--seconds" => seconds = value("--seconds"),
            "--clients" => clients = value("--clients") as usize,
            "--huge" => huge = Some(value("--huge") as usize),
            "--seed" => seed = Some(value("--seed")),
            "--deadline" => deadline = Some(Duration::from_secs(value("--deadline"))),
            "--cache-mib" => cache_mib = Some(value("--cache-mib")),
            "--keep" => keep = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => fail(&format!("unknown argument {other}")),
        }
    }
    if seconds < 30 || clients == 0 {
        fail("--seconds must be at least 30 and --clients at least 1");
    }
    let mut cfg = Config::new(seconds, clients);
    cfg.huge = huge.unwrap_or(cfg.huge);
    cfg.seed = seed.unwrap_or(cfg.seed);
    cfg.deadline = deadline.unwrap_or(cfg.deadline);
    cfg.cache_mib = cache_mib.unwrap_or(cfg.cache_mib);
    cfg.keep = keep;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let report = rt.block_on(run(&cfg));
    print!("{}", report.render());
    if !report.passed() {
        std::process::exit(1);
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("soak: {msg}\n{USAGE}");
    std::process::exit(2);
}
