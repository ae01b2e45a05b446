#!/usr/bin/env bash
# Every check CI runs: formatting, lints, then all tests in release mode (the engine tests are
# slow unoptimised). Needs the Rust toolchain with rustfmt and clippy; installs with apt-get what
# is missing: Python 3's venv for the grpcio client example, and etcd-server for the membership
# tests. The golden fixtures are committed.
set -euo pipefail
cd "$(dirname "$0")/.."

# Every CUDA kernel must compile with NVRTC, which needs no GPU: NVIDIA's nvidia-cuda-nvrtc
# wheel provides libnvrtc, in a virtual environment of its own. YOCO_REQUIRE_NVRTC makes a
# missing library a failure instead of a skip.
NVRTC_REQ="nvidia-cuda-nvrtc==13.5.37"
if [ "$(cat target/nvrtc-env/requirement 2>/dev/null)" != "$NVRTC_REQ" ]; then
  rm -rf target/nvrtc-env
  python3 -m venv target/nvrtc-env || { SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo";
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3 python3-venv >/dev/null; python3 -m venv target/nvrtc-env; }
  target/nvrtc-env/bin/pip install --quiet --disable-pip-version-check "$NVRTC_REQ"
  echo "$NVRTC_REQ" > target/nvrtc-env/requirement
fi
NVRTC_LIB="$(cd "$(dirname "$(find target/nvrtc-env -name 'libnvrtc.so.*' | head -1)")" && pwd)"
# The CUDA kernels also run on the CPU, in an emulator built with the host C++ compiler
# (worker/tests/cuda_emulated.rs, part of the workspace tests below).
if ! command -v c++ >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
fi
# The membership tests run a real etcd server: Debian's etcd-server.
if ! command -v etcd >/dev/null 2>&1 && [ -z "${YOCO_TEST_ETCD:-}" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
fi
# The metrics are checked with Prometheus's own linter, promtool: Debian's prometheus package.
if ! command -v promtool >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
# The Python client example (examples/python) is tested against a real server, with grpcio in
# a virtual environment of its own.
if ! cmp -s examples/python/requirements.txt target/pyenv/requirements.txt; then
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c "import ensurepip" 2>/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3 python3-venv >/dev/null
  fi
  rm -rf target/pyenv
  python3 -m venv target/pyenv
  target/pyenv/bin/pip install --quiet --disable-pip-version-check -r examples/python/requirements.txt
  cp examples/python/requirements.txt target/pyenv/requirements.txt
fi
# The fuzz build (scripts/fuzz.sh, at the end: every dependency again, with AddressSanitizer,
# a fifth of CI) starts now at the lowest CPU priority, so that it takes a core whenever the
# builds and tests below leave one idle (linking, one crate waiting on another, tests waiting on
# processes and timers) and otherwise yields. It stays in this session: with the kernel's
# autogroup scheduling each session gets a fair share whatever its niceness, so one of its own
# would take half the machine (measured: lints twice as slow). An early exit stops it.
mkdir -p target
nice -n 19 bash scripts/fuzz.sh build >target/fuzz-build.log 2>&1 &
fuzz_build=$!
kill_tree() {
  local child
  for child in $(pgrep -P "$1" || true); do kill_tree "$child"; done
  kill "$1" 2>/dev/null || true
}
trap 'kill_tree $fuzz_build' EXIT

cargo fmt --all -- --check
# Lints in the release profile, so that the build scripts and proc macros they compile are the
# ones the release build below reuses (the dev profile optimises dependencies, proc macros
# included, and shares nothing with it).
cargo clippy --workspace --all-targets --release --locked -- -D warnings
# The CUDA backend and the NCCL transport (feature `cuda`) must build and lint without CUDA
# installed.
cargo clippy -p yoco --features cuda --all-targets --release --locked -- -D warnings
bash scripts/validate-deploy.sh  # deploy/: the Kubernetes manifests and the Dockerfiles
# All tests run on one build with the `cuda` feature (building the engine twice, with and
# without it, took a third of CI): the CPU engine is the same code, and on this machine without
# a GPU the CUDA build must fall back to it (`--device auto`), refuse `--device cuda` and NCCL
# cleanly, compile every kernel with NVRTC (tests/cuda_nvrtc.rs) and find no GPU
# (tests/cuda_device.rs). The build without the feature is linted above. The end-to-end tests
# (tests/) run target/release/yoco, which this same command builds (the `yoco` package has an
# integration test, coordinator/tests/cli.rs) with the features of the whole test build: a
# `cargo build -p yoco` before it would resolve them without the test-only crates and build
# the engine a second time.
LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" YOCO_REQUIRE_NVRTC=1 YOCO_REQUIRE_PROMTOOL=1 \
  cargo test --workspace --release --locked --features yoco/cuda,yoco-worker/cuda
# The background fuzz build, then fuzzing for a bounded time (cargo-fuzz, libFuzzer with
# AddressSanitizer; 20 s per target): request validation, worker Step messages, collective
# frames, params.json, safetensors and tokenizer input must not panic, hang or allocate without
# bound.
fuzz_rc=0
wait "$fuzz_build" || fuzz_rc=$?
trap - EXIT
sed 's/^/[fuzz build] /' target/fuzz-build.log | tail -5
[ "$fuzz_rc" -eq 0 ] || { cat target/fuzz-build.log; echo "fuzz build failed ($fuzz_rc)" >&2; exit 1; }
bash scripts/fuzz.sh run
