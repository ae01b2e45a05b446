#!/usr/bin/env bash
# Every check CI runs: formatting, lints, then all tests in release mode (the engine tests are
# slow unoptimised). Needs the Rust toolchain with rustfmt and clippy; installs with apt-get what
# is missing: Python 3's venv for the grpcio client example, and etcd-server for the membership
# tests. The golden fixtures are committed.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The NCCL transport (feature `cuda`) must build and lint without CUDA installed; its test checks
# that forming an NCCL group without a GPU is a clean error on every rank.
cargo clippy -p yoco --features cuda --all-targets --locked -- -D warnings
bash scripts/validate-deploy.sh  # deploy/: the Kubernetes manifests and the Dockerfiles
# (In release mode, so that it shares the dependencies of the release build below.)
cargo test -p yoco-worker --features cuda --lib --release --locked comm::
# Every CUDA kernel must compile with NVRTC, which needs no GPU: NVIDIA's nvidia-cuda-nvrtc
# wheel provides libnvrtc, in a virtual environment of its own. YOCO_REQUIRE_NVRTC makes a
# missing library a failure instead of a skip. The CUDA backend's op tests (cuda_device) skip without a GPU
# and check that opening one is then a clean error.
NVRTC_REQ="nvidia-cuda-nvrtc==13.5.37"
if [ "$(cat target/nvrtc-env/requirement 2>/dev/null)" != "$NVRTC_REQ" ]; then
  rm -rf target/nvrtc-env
  python3 -m venv target/nvrtc-env || { SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo";
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3 python3-venv >/dev/null; python3 -m venv target/nvrtc-env; }
  target/nvrtc-env/bin/pip install --quiet --disable-pip-version-check "$NVRTC_REQ"
  echo "$NVRTC_REQ" > target/nvrtc-env/requirement
fi
NVRTC_LIB="$(cd "$(dirname "$(find target/nvrtc-env -name 'libnvrtc.so.*' | head -1)")" && pwd)"
LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" YOCO_REQUIRE_NVRTC=1 \
  cargo test -p yoco-worker --features cuda --release --locked --test cuda_nvrtc --test cuda_device
# A CUDA build on a machine without a GPU falls back to the CPU (`--device auto`), and an explicit
# `--device cuda` is a clean error.
cargo test -p yoco --features cuda --release --locked --lib generate::
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
# The end-to-end tests (tests/) run target/release/yoco, and `cargo test` does not build
# another package's binary, so build it first.
cargo build --release --locked -p yoco
cargo test --workspace --release --locked
# Fuzzing for a bounded time (cargo-fuzz, libFuzzer with AddressSanitizer; 20 s per target):
# request validation, worker Step messages, collective frames, params.json, safetensors and
# tokenizer input must not panic, hang or allocate without bound.
bash scripts/fuzz.sh
