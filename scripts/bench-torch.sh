#!/usr/bin/env bash
# yoco against PyTorch eager on this machine, in one run: prefill at 4K/16K/32K and decode after
# each, yoco in f32 and bf16 compute, PyTorch in f32 and bf16 (tools/bench/torch_yoco.py), on
# the same random model (default: the small preset), alternated rounds, best of each.
#
#   scripts/bench-torch.sh [PRESET] [LENGTHS] [extra `yoco bench` flags...]
#
# PyTorch comes from the tools' virtual environment, target/trainenv (tools/train/requirements.txt;
# made here when missing — a CPU wheel from PyPI, about 5 GB with its CUDA libraries, which the
# CPU never loads). ROUNDS sets the rounds (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET="${1:-small}"
LENGTHS="${2:-4096,16384,32768}"
shift $(( $# > 2 ? 2 : $# ))
ENV=target/trainenv
if ! "$ENV/bin/python" -c "import torch, safetensors" 2>/dev/null; then
  python3 -m venv "$ENV"
  "$ENV/bin/pip" install --quiet --disable-pip-version-check -r tools/train/requirements.txt
fi
cargo build --release --locked -p yoco
exec ./target/release/yoco bench --preset "$PRESET" --lengths "$LENGTHS" --batches 0 --process-context 0 \
  --cache-dtypes none --weight-dtypes none --compute-dtypes none \
  --torch "$ENV/bin/python" --torch-rounds "${ROUNDS:-3}" "$@"
