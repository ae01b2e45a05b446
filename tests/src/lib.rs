//! Helpers for the end-to-end tests: find the `yoco` binary that cargo built beside this test
//! executable, and run it with a clean environment.
//!
//! `cargo test` builds a package's binaries only for that package's own integration tests, and
//! `yoco` has one (`coordinator/tests/cli.rs`), so `cargo test --workspace` builds the binary
//! these tests run, with the same features; `cargo test -p yoco-e2e` alone needs
//! `cargo build -p yoco` first. `YOCO_BIN=/path/to/yoco` overrides the lookup.

pub mod cluster;
pub mod etcd;
pub mod http;
pub mod server;
pub mod soak;
pub mod sockets;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

/// The `yoco` binary of this build profile: `target/<profile>/yoco`, the parent of the `deps`
/// folder this test executable runs from, or the folder of this crate's own binary (so
/// `CARGO_TARGET_DIR` and `--target` are followed).
pub fn yoco_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("YOCO_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    // Tests run from target/<profile>/deps, this crate's binaries (`soak`) from target/<profile>.
    let dir = exe.parent().expect("the executable lies in a folder");
    let profile_dir = if dir.ends_with("deps") {
        dir.parent().expect("the test executable lies in target/<profile>/deps")
    } else {
        dir
    };
    let bin = profile_dir.join(format!("yoco{}", std::env::consts::EXE_SUFFIX));
    let profile = profile_dir.file_name().unwrap_or_default().to_string_lossy();
    let flag = match &*profile {
        "debug" => String::new(),
        "release" => " --release".to_string(),
        other => format!(" --profile {other}"),
    };
    let Ok(built) = bin.metadata().and_then(|m| m.modified()) else {
        panic!(
            "{} does not exist: build it first with `cargo build -p yoco{flag}` \
             (`cargo test` does not build other packages' binaries; scripts/test.sh does both)",
            bin.display()
        );
    };
    if let Some(newer) = newer_source(&bin, built) {
        panic!("{} is older than {}: rebuild it with `cargo build -p yoco{flag}`", bin.display(), newer.display());
    }
    bin
}

/// A source file of the binary that changed after it was built, if any: the files are those cargo
/// lists in the binary's dep-info (`yoco.d` beside it), the ones whose mtime makes it rebuild.
fn newer_source(bin: &Path, built: SystemTime) -> Option<PathBuf> {
    let dep_info = std::fs::read_to_string(bin.with_file_name("yoco.d")).ok()?;
    // `target: src1 src2 …`, with spaces inside paths escaped as `\ `.
    let (_, sources) = dep_info.split_once(": ")?;
    let sources = sources.replace("\\ ", "\0");
    sources
        .split_whitespace()
        .map(|s| PathBuf::from(s.replace('\0', " ")))
        .find(|path| path.metadata().and_then(|m| m.modified()).is_ok_and(|t| t > built))
}

/// A finished `yoco` run.
pub struct Run {
    pub args: Vec<String>,
    pub output: Output,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// Asserts that the run succeeded and returns it.
    pub fn ok(self) -> Self {
        assert!(
            self.output.status.success(),
            "yoco {:?} failed ({}):\n{}",
            self.args,
            self.output.status,
            self.stderr()
        );
        self.assert_no_panic();
        self
    }

    /// Asserts that the run failed cleanly (non-zero exit, no panic) with a message on stderr
    /// containing every one of `parts`.
    pub fn fails_with(self, parts: &[&str]) -> Self {
        assert!(
            !self.output.status.success(),
            "yoco {:?} succeeded but should have failed; stdout:\n{}",
            self.args,
            self.stdout()
        );
        assert!(
            self.output.status.code().is_some(),
            "yoco {:?} was killed by a signal ({})",
            self.args,
            self.output.status
        );
        self.assert_no_panic();
        let err = self.stderr();
        for part in parts {
            assert!(err.contains(part), "yoco {:?}: stderr does not mention {part:?}:\n{err}", self.args);
        }
        self
    }

    fn assert_no_panic(&self) {
        let err = self.stderr();
        assert!(!err.contains("panicked"), "yoco {:?} panicked:\n{err}", self.args);
    }

    /// Stdout parsed as one JSON value.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout())
            .unwrap_or_else(|e| panic!("yoco {:?}: stdout is not JSON ({e}):\n{}", self.args, self.stdout()))
    }
}

/// Runs `yoco args…` with `YOCO_HOME` at `home` and no other `YOCO_*` settings from the caller's
/// environment, so a developer's configuration cannot change the outcome.
pub fn yoco(home: &Path, args: &[&str]) -> Run {
    let mut cmd = Command::new(yoco_bin());
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("YOCO_") {
            cmd.env_remove(&key);
        }
    }
    // Errors without anyhow's backtrace (a panic still prints its own message).
    cmd.env("YOCO_HOME", home).env("RUST_LOG", "warn").env("RUST_LIB_BACKTRACE", "0");
    let output = cmd.output().expect("run yoco");
    Run { args: args.iter().map(|s| s.to_string()).collect(), output }
}

/// A Python interpreter with `grpcio` for the client examples: `$YOCO_PYTHON`, else the virtual
/// environment `scripts/test.sh` makes (`target/pyenv`). Missing, it is an error, not a skip.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("YOCO_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python");
    assert!(
        venv.exists(),
        "no Python with grpcio: run scripts/test.sh (it makes target/pyenv), or set YOCO_PYTHON to an \
         interpreter with `pip install -r examples/python/requirements.txt`"
    );
    venv
}

/// A `tiny` preset model with random weights and a `vocab`-token vocabulary in `home/m`.
pub fn init_tiny_model(home: &Path, vocab: usize) -> PathBuf {
    let dir = home.join("m");
    let vocab = vocab.to_string();
    yoco(home, &["init-model", "--preset", "tiny", "--vocab-size", &vocab, "--out", dir.to_str().unwrap()]).ok();
    dir
}

/// `n` prompt token ids below `vocab`, different for each `salt`.
pub fn prompt_ids(n: usize, salt: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + salt * 101 + 11) % vocab) as u32).collect()
}

/// Prometheus's `promtool` (Debian's `prometheus` package, which scripts/test.sh installs); None
/// (with a note) where it is missing, unless `YOCO_REQUIRE_PROMTOOL` makes that a failure.
pub fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("promtool"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("YOCO_REQUIRE_PROMTOOL").is_none(),
            "promtool not found and YOCO_REQUIRE_PROMTOOL is set"
        );
        eprintln!("promtool not found (apt-get install prometheus): the metrics check is skipped");
    }
    found
}
