//! The soak run (`src/soak.rs`, the `soak` binary runs it for minutes) for a short time: 45 s of
//! load from 16 clients over two worker groups, one rank killed and restarted midway. It fails
//! on an unexpected error, a hung request, a group that served nothing after the kill, cache
//! left on a worker after the load, a panic, or coordinator memory that keeps growing.

use yoco_e2e::soak::{run, Config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_with_a_rank_killed_midway_passes_its_checks() {
    let mut cfg = Config::new(45, 16);
    cfg.deadline = std::time::Duration::from_secs(120);
    let report = run(&cfg).await;
    let text = report.render();
    eprintln!("{text}");
    assert!(report.passed(), "{text}");
}
