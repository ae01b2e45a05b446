#!/usr/bin/env bash
# Fuzzing for a bounded time: builds every target of fuzz/ once with cargo-fuzz (libFuzzer with
# AddressSanitizer), then runs each for FUZZ_SECONDS (default 20) seconds, starting from its
# committed seeds (fuzz/corpus/<target>/seed-*). Fails if any target finds a crash (a panic, a
# failed assertion, a memory error), an input slower than 10 s, or an allocation or RSS over
# 2 GiB; the input is kept under fuzz/artifacts/<target>/, and
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/<file>
# replays it. See fuzz/README.md.
#
# Needs only rustup's stable toolchain: RUSTC_BOOTSTRAP=1 lets stable rustc take the unstable
# flags cargo-fuzz passes (-Zsanitizer=address, the coverage passes). Installs cargo-fuzz when
# missing, and with apt-get a C++ compiler when there is none (libfuzzer-sys builds libFuzzer).
#
# `fuzz.sh build` only builds (scripts/test.sh starts it early, in the background), `fuzz.sh run`
# builds what is not yet built and runs; no argument is `run`.
#
# Environment: FUZZ_SECONDS (per target), FUZZ_TARGETS (space-separated subset; default all),
# FUZZ_JOBS (targets run at once, one core each; default the number of cores, at most 6),
# FUZZ_SANITIZER (address, or none where ASan is unavailable).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-20}"
sanitizer="${FUZZ_SANITIZER:-address}"
jobs="${FUZZ_JOBS:-$(nproc)}"
[ "$jobs" -gt 6 ] && jobs=6
export RUSTC_BOOTSTRAP=1

if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1 && ! command -v clang++ >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
start=$(date +%s)
# One build for all targets (they share every dependency); `cargo fuzz run` below, with the same
# flags, finds it up to date.
cargo fuzz build -s "$sanitizer"
echo "fuzz: built in $(($(date +%s) - start)) s"
[ "${1:-run}" = build ] && exit 0

logs=fuzz/target/fuzz-logs
rm -rf "$logs"
mkdir -p "$logs"
run_one() {
  local target=$1
  # New inputs go to a scratch corpus under fuzz/target, not among the committed seeds.
  mkdir -p "fuzz/target/corpus/$target" "fuzz/artifacts/$target"
  if cargo fuzz run -s "$sanitizer" "$target" "fuzz/target/corpus/$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$target/" >"$logs/$target.log" 2>&1; then
    echo ok >"$logs/$target.status"
  else
    echo failed >"$logs/$target.status"
  fi
  # The log without libFuzzer's progress lines: the start, any crash report, the final stats.
  grep -v -E '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)' "$logs/$target.log" | sed "s/^/[$target] /" || true
}

echo "fuzz: $(echo $targets | wc -w) targets, ${seconds} s each, $jobs at a time"
running=0
for target in $targets; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
  run_one "$target" &
  running=$((running + 1))
done
wait

failed=()
for target in $targets; do
  [ "$(cat "$logs/$target.status" 2>/dev/null)" = ok ] || failed+=("$target")
done
echo "fuzz: $(($(date +%s) - start)) s in all"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]} (logs in $logs/, inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz: no crashes in: $(echo $targets)"
