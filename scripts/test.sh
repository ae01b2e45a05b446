#!/usr/bin/env bash
# Every check CI runs: formatting, lints, then all tests in release mode (the engine tests are
# slow unoptimised). Needs only the Rust toolchain with rustfmt and clippy; the golden fixtures
# are committed, so no Python is needed.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The NCCL transport (feature `cuda`) must build and lint without CUDA installed; its test checks
# that forming an NCCL group without a GPU is a clean error on every rank.
cargo clippy -p yoco --features cuda --all-targets --locked -- -D warnings
cargo test -p yoco-worker --features cuda --lib --locked comm::
# The end-to-end tests (tests/) run target/release/yoco, and `cargo test` does not build
# another package's binary, so build it first.
cargo build --release --locked -p yoco
cargo test --workspace --release --locked
