#!/usr/bin/env bash
# Every check CI runs: formatting, lints, then all tests in release mode (the engine tests are
# slow unoptimised). Needs only the Rust toolchain with rustfmt and clippy; the golden fixtures
# are committed, so no Python is needed.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests (tests/) run target/release/yoco, and `cargo test` does not build
# another package's binary, so build it first.
cargo build --release --locked -p yoco
cargo test --workspace --release --locked
