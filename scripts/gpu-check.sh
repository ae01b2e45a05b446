#!/usr/bin/env bash
# The CUDA backend's checks on a GPU, in two steps (the GPU machines have no Rust toolchain):
#
#   scripts/gpu-check.sh build   here: builds the CUDA test binaries and the backend benchmark
#                                (feature `cuda`), stripped, into target/gpu-check/ — the folder
#                                to carry to the GPU machine
#   scripts/gpu-check.sh run     on the GPU machine: finds NVIDIA's libraries (cuBLAS, NVRTC,
#                                NCCL from the CUDA toolkit or the nvidia-* wheels), then runs
#                                every kernel against the CPU kernels with YOCO_REQUIRE_GPU set,
#                                so that a missing GPU or library fails instead of skipping; then
#                                generation and serving against the CPU, and the benchmark of the
#                                3b preset in bf16 at 128K tokens (prefill time, decode tokens/s,
#                                GPU memory): about 6 minutes on one H100.
#                                Writes the log to $OUT (or target/gpu-check/) as gpu-check.log.
#   scripts/gpu-check.sh bench   on the GPU machine, after `run`: the 3b preset in bf16 at 512K and
#                                at 1M tokens, one process each (a run cut short by its bound still
#                                reports the other); the log is gpu-bench.log. YOCO_GPU_BENCH_CONTEXTS
#                                overrides the contexts (comma-separated), YOCO_GPU_BENCH_SECONDS
#                                each one's bound (default 280).
#   scripts/gpu-check.sh libs    the CUDA libraries `run` would put on LD_LIBRARY_PATH (the
#                                Python environment's nvidia-* wheels first, never stubs/), and
#                                the files they resolve to
#   scripts/gpu-check.sh served DEVICE...
#                                a served comparison alone (part of `run`, with cpu, cuda and
#                                cudax2): for each DEVICE, `yoco serve` with one worker on it
#                                (DEVICExN: N workers on it, one context-parallel group; on a
#                                GPU they share it, TCP between them), called over
#                                gRPC with `yoco client generate` (a 3000-token prompt, 48 greedy
#                                tokens with prompt log-probabilities, then the same request
#                                without them, from the cached prefix); every device's greedy
#                                tokens must equal the first one's. DEVICExNtpT: the N workers
#                                as a T × N/T tensor × context-parallel grid. Runs here too:
#                                `served cpu cpux2 cpux2tp2` checks the script without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=target/gpu-check
TESTS=(cuda_nvrtc cuda_device)

YOCO="${YOCO_BIN:-$DIR/yoco}"

# The CUDA libraries cudarc loads by name at run time.
CUDA_LIBS=(libcublas.so libcublasLt.so libnvrtc.so libnccl.so)

# lib_dirs: the folders to put first on LD_LIBRARY_PATH, one per library of CUDA_LIBS found
# (colon-separated): the Python environment's NVIDIA wheels (site-packages/nvidia/*/lib) first,
# then what ldconfig knows, then a search of the disk; never a toolkit's stubs/ folder, whose
# libcuda.so (which cudarc tries before libcuda.so.1) fails every call.
lib_dirs() {
  local lib dir found out=""
  local wheels
  wheels="$(python3 -c 'import glob, site
for p in site.getsitepackages() + [site.getusersitepackages()]:
    print("\n".join(sorted(glob.glob(p + "/nvidia/*/lib"))))' 2>/dev/null || true)"
  for lib in "${CUDA_LIBS[@]}"; do
    found=""
    for dir in $wheels $(ldconfig -p 2>/dev/null | awk -v l="$lib" 'index($1, l) == 1 {print $NF}' | xargs -r -n1 dirname); do
      case "$dir" in */stubs | */stubs/*) continue ;; esac
      if compgen -G "$dir/$lib*" >/dev/null; then found="$dir"; break; fi
    done
    if [ -z "$found" ]; then
      found="$(find / \( -path /proc -o -path /sys -o -path '*/stubs' \) -prune -o -name "$lib*" -print 2>/dev/null \
        | head -1 | xargs -r dirname || true)"
    fi
    [ -n "$found" ] && case ":$out:" in *":$found:"*) ;; *) out="$out:$found" ;; esac
  done
  echo "${out#:}"
}

# show_libs: which file each library of CUDA_LIBS (and libcuda) resolves to on LD_LIBRARY_PATH,
# and the driver's CUDA version, so that a failed run says what it loaded.
show_libs() {
  local lib dir f
  for lib in libcuda.so "${CUDA_LIBS[@]}"; do
    f=""
    for dir in ${LD_LIBRARY_PATH//:/ } $(ldconfig -p 2>/dev/null | awk -v l="$lib" 'index($1, l) == 1 {print $NF}' | xargs -r -n1 dirname); do
      f="$(compgen -G "$dir/$lib*" | sort | tail -1 || true)"
      [ -n "$f" ] && break
    done
    if [ -n "$f" ]; then echo "library $lib: $(readlink -f "$f")"; else echo "library $lib: not found"; fi
  done
  nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' || echo "CUDA driver: not found (no nvidia-smi)"
}

# served_check DEVICE...: see the usage above. Writes served-DEVICE-*.json under $out.
served_check() {
  local model dev pid addr ids status=0
  model="$(mktemp -d)/tiny"
  "$YOCO" init-model --preset tiny --dtype f32 --out "$model" >/dev/null
  ids="$(python3 -c 'print(",".join(str((i * 7919 + 13) % 100288) for i in range(3000)))')"
  for dev in "$@"; do
    local workers=1 tp=1 device="$dev"
    if [[ "$dev" =~ ^(.+)x([0-9]+)(tp([0-9]+))?$ ]]; then
      device="${BASH_REMATCH[1]}" workers="${BASH_REMATCH[2]}" tp="${BASH_REMATCH[4]:-1}"
    fi
    # Port 0, and the address read back from the one line serve prints on stdout.
    "$YOCO" serve --model "$model" --workers "$workers" --tp "$tp" --worker-device "$device" --listen 127.0.0.1:0 \
      --http-listen 127.0.0.1:0 >"$out/serve-$dev.out" 2>"$out/serve-$dev.log" &
    pid=$!
    addr=""
    for _ in $(seq 1 120); do
      addr="$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    if l.startswith("{") and json.loads(l).get("event") == "listening": print(json.loads(l)["grpc"])' "$out/serve-$dev.out" 2>/dev/null || true)"
      [ -n "$addr" ] && "$YOCO" client --addr "http://$addr" info >"$out/served-$dev-info.json" 2>/dev/null && break
      kill -0 "$pid" 2>/dev/null || { echo "yoco serve --worker-device $dev exited:"; cat "$out/serve-$dev.log"; break; }
      sleep 1
    done
    # The first call asks for prompt log-probabilities (the cross-decoder at every prompt
    # position, so it cannot start from a cached prefix); the second reuses its prefix.
    "$YOCO" client --addr "http://$addr" generate --prompt-ids "$ids" --max-tokens 48 --ignore-eos \
      --logprobs 2 --prompt-logprobs --json >"$out/served-$dev-first.json" || status=1
    "$YOCO" client --addr "http://$addr" generate --prompt-ids "$ids" --max-tokens 48 --ignore-eos \
      --logprobs 2 --json >"$out/served-$dev-again.json" || status=1
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  python3 - "$out" "$@" <<'PY' || status=1
import json, sys
out, devices = sys.argv[1], sys.argv[2:]
def load(dev, call):
    return json.load(open(f"{out}/served-{dev}-{call}.json"))
base = load(devices[0], "first")
def equal_up_to_a_near_tie(got):
    """How many tokens agree with the base's; a difference must be at a near-tie of the base's
    top two (log-probabilities within 1e-4: rounding may break such a tie either way)."""
    same = sum(1 for _ in __import__("itertools").takewhile(lambda t: t[0] == t[1], zip(base["tokens"], got["tokens"])))
    if same < len(base["tokens"]):
        top = base["top_logprobs"][same]
        gap = abs(top[0]["logprob"] - top[1]["logprob"])
        print(f"  first difference at token {same}: top-2 gap {gap:.2e}")
        assert got["tokens"][same] in {t["token"] for t in top[:2]} and gap < 1e-4, "greedy tokens differ, not at a near-tie"
    return same
for dev in devices:
    info = json.load(open(f"{out}/served-{dev}-info.json"))
    ranks = [r["device"] for r in info["ranks"]]
    for call in ("first", "again"):
        got = load(dev, call)
        same = equal_up_to_a_near_tie(got)
        worst = max(abs(a - b) for a, b in zip(base["logprobs"][:same + 1], got["logprobs"][:same + 1]))
        prompt = [(a, b) for a, b in zip(base["prompt_logprobs"] or [], got["prompt_logprobs"] or [])
                  if a is not None and b is not None]
        worst_prompt = max((abs(a - b) for a, b in prompt), default=0.0)
        print(f"served {dev} ({','.join(map(str, ranks)) or '?'}) {call}: cached {got['usage']['cached_prompt_tokens']}, "
              f"tokens equal {same} of {len(base['tokens'])}, |Δ logprob| {worst:.2e}, prompt {worst_prompt:.2e}, "
              f"prefill tok/s {got['timing']['prefill_tokens_per_second']:.0f}, decode tok/s {got['timing']['decode_tokens_per_second']:.1f}")
PY
  return $status
}

case "${1:-}" in
  served)
    shift
    [ $# -gt 0 ] || { echo "usage: $0 served DEVICE..." >&2; exit 2; }
    out="${OUT:-$DIR}"
    mkdir -p "$out"
    served_check "$@"
    ;;
  build)
    rm -rf "$DIR" && mkdir -p "$DIR"
    cargo test -p yoco-worker --features cuda --release --locked --no-run --message-format=json \
      $(printf -- '--test %s ' "${TESTS[@]}") >"$DIR/build.json"
    for t in "${TESTS[@]}"; do
      exe="$(python3 -c 'import json,sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[2] and m.get("executable"):
        print(m["executable"])' "$DIR/build.json" "$t" | tail -1)"
      [ -n "$exe" ] || { echo "no executable for test $t" >&2; exit 1; }
      strip -o "$DIR/$t" "$exe"
    done
    rm "$DIR/build.json"
    cargo build -p yoco-worker --features cuda --release --locked --example backend_bench
    strip -o "$DIR/backend_bench" target/release/examples/backend_bench
    # The CLI with the CUDA backend, for end-to-end generation (then the CPU build is rebuilt,
    # so that the end-to-end tests here keep running the binary they expect).
    cargo build -p yoco --features cuda --release --locked
    strip -o "$DIR/yoco" target/release/yoco
    cargo build -p yoco --release --locked
    du -sh "$DIR"
    ;;
  run)
    out="${OUT:-$DIR}"
    mkdir -p "$out"
    libs="$(lib_dirs)"
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export YOCO_REQUIRE_GPU=1 YOCO_REQUIRE_NVRTC=1
    {
      echo "# $(date -u) on $(hostname)"
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
      echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
      show_libs
      status=0
      for t in "${TESTS[@]}"; do
        echo "## $t"
        (cd worker && CARGO_MANIFEST_DIR="$PWD" "../$DIR/$t" --nocapture --test-threads 1) || status=1
      done
      echo "## yoco generate: the tiny preset in f32, greedy, --device cuda against --device cpu"
      tiny="$(mktemp -d)/tiny"
      "$DIR/yoco" init-model --preset tiny --dtype f32 --out "$tiny"
      ids="$(python3 -c 'print(",".join(str((i * 7919 + 13) % 100288) for i in range(3000)))')"
      for dev in cpu cuda; do
        "$DIR/yoco" generate --model "$tiny" --device "$dev" --prompt-ids "$ids" --max-tokens 64 --ignore-eos \
          --logprobs 2 --json >"$out/generate-$dev.json" || status=1
      done
      python3 - "$out/generate-cpu.json" "$out/generate-cuda.json" <<'PY' || status=1
import json, sys
cpu, gpu = (json.load(open(p)) for p in sys.argv[1:3])
assert gpu["device"] == "cuda", gpu["device"]
same = sum(1 for _ in __import__("itertools").takewhile(lambda t: t[0] == t[1], zip(cpu["tokens"], gpu["tokens"])))
worst = max(abs(a - b) for a, b in zip(cpu["logprobs"][:same + 1], gpu["logprobs"][:same + 1]))
print(f"greedy tokens equal: {same} of {len(cpu['tokens'])}; largest |logprob difference| {worst:.2e}")
print(f"prefill tok/s cpu {cpu['timing']['prefill_tokens_per_second']:.0f} cuda {gpu['timing']['prefill_tokens_per_second']:.0f}; "
      f"decode tok/s cpu {cpu['timing']['decode_tokens_per_second']:.1f} cuda {gpu['timing']['decode_tokens_per_second']:.1f}")
if cpu["tokens"] != gpu["tokens"]:
    # Equal up to a near-tie: where they first differ, the two tokens are the CPU's top two
    # with log-probabilities within 1e-4 (the GPU's rounding may break such a tie either way).
    i = same
    top = cpu["top_logprobs"][i]
    gap = abs(top[0]["logprob"] - top[1]["logprob"]) if len(top) > 1 else float("inf")
    pair = {t["token"] for t in top[:2]}
    print(f"first difference at token {i}: cpu {cpu['tokens'][i]} gpu {gpu['tokens'][i]}, CPU top-2 gap {gap:.2e}")
    assert gpu["tokens"][i] in pair and gap < 1e-4, "greedy tokens differ in f32, and not at a near-tie"
PY
      echo "## yoco serve: one worker on the GPU against one on the CPU, over gRPC; two sharing it, cp 2 and tp 2"
      served_check cpu cuda cudax2 cudax2tp2 || status=1
      echo "## backend_bench: tiny, f32 (a warm-up)"
      "$DIR/backend_bench" --device cuda --preset tiny --dtype f32 --contexts 4096,65536 --decode 16 || status=1
      echo "## backend_bench: 3b, bf16, 128K"
      # Bounded, so that the whole run keeps within the device tool's 10 minutes a command.
      timeout 150 "$DIR/backend_bench" --device cuda --preset 3b --dtype bf16 --decode 16 --chunk 16384 \
        --contexts 131072 || status=1
      echo "# gpu-check: $([ $status -eq 0 ] && echo passed || echo FAILED)"
      exit $status
    } 2>&1 | tee "$out/gpu-check.log"
    ;;
  bench)
    out="${OUT:-$DIR}"
    mkdir -p "$out"
    export LD_LIBRARY_PATH="$(lib_dirs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export YOCO_REQUIRE_GPU=1
    {
      echo "# $(date -u) on $(hostname)"
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
      status=0
      IFS=, read -ra contexts <<<"${YOCO_GPU_BENCH_CONTEXTS:-524288,1048576}"
      for ctx in "${contexts[@]}"; do
        echo "## backend_bench: 3b, bf16, $ctx tokens"
        # One process per context: each prints its row when done, and a context cut short by its
        # bound leaves the others their time.
        timeout "${YOCO_GPU_BENCH_SECONDS:-280}" "$DIR/backend_bench" --device cuda --preset 3b --dtype bf16 \
          --decode 16 --chunk 16384 --contexts "$ctx" || status=1
      done
      echo "# gpu-check bench: $([ $status -eq 0 ] && echo passed || echo FAILED)"
      exit $status
    } 2>&1 | tee "$out/gpu-bench.log"
    ;;
  libs)
    LD_LIBRARY_PATH="$(lib_dirs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" show_libs
    ;;
  *)
    echo "usage: $0 build|run|bench|served DEVICE...|libs" >&2
    exit 2
    ;;
esac
