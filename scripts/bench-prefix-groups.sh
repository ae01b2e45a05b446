#!/usr/bin/env bash
# One long document asked ten questions over two worker groups (etcd membership, one worker
# each): time to first token with cache-aware vs least-loaded routing, and with the document
# served from memory, from the disk tier, or prefilled every time.
#
#   scripts/bench-prefix-groups.sh [DOC_TOKENS] [OUT_DIR]
#
# DOC_TOKENS defaults to 262144. Runs `yoco client bench-prefix --groups 2 --json` against a
# coordinator started four times over the same two workers (the workers stay; each start
# re-forms their groups, which drops what they cached):
#   cache-aware      --route-policy cache-aware                      (memory)
#   least-loaded     --route-policy least-loaded                     (memory)
#   disk             cache-aware, --prefix-disk-dir, --prefix-memory-mib 0: every hit read
#                    back from disk
#   prefilled        --no-prefix-cache (3 questions: each prefills the whole document)
# and prints the table (also OUT_DIR/table.md, with each run's JSON and the coordinator's log
# beside it: its "prefix-cache disk tier" lines time every write and read). RUNS picks some
# (default "cache-aware least-loaded disk prefilled"). Needs etcd on PATH (Debian's
# etcd-server) and a release build (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
DOC=${1:-262144}
OUT=${2:-target/bench-prefix-groups}
YOCO=${YOCO:-target/release/yoco}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
EC=$(port)
EP=$(port)
etcd --name b --data-dir "$WORK/etcd" --listen-client-urls "http://127.0.0.1:$EC" \
    --advertise-client-urls "http://127.0.0.1:$EC" --listen-peer-urls "http://127.0.0.1:$EP" \
    --initial-advertise-peer-urls "http://127.0.0.1:$EP" --initial-cluster "b=http://127.0.0.1:$EP" \
    >"$WORK/etcd.log" 2>&1 &
pids+=($!)
ETCD="http://127.0.0.1:$EC"
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$EC") 2>/dev/null && break
    sleep 0.1
done

# One thread each: the two groups share this machine's cores.
for g in g0 g1; do
    YOCO_THREADS=1 "$YOCO" worker --etcd "$ETCD" --cluster bench --group "$g" --rank 0 --world 1 \
        --cache-mib 4096 </dev/null >"$WORK/worker-$g.out" 2>"$OUT/worker-$g.log" &
    pids+=($!)
done

# Runs the coordinator with "$@", waits for both groups, runs the bench into $OUT/$NAME.json.
run() {
    local name=$1 questions=$2
    shift 2
    local grpc http
    grpc=$(port)
    http=$(port)
    "$YOCO" coordinator --etcd "$ETCD" --cluster bench --listen "127.0.0.1:$grpc" \
        --http-listen "127.0.0.1:$http" --cache-mib 4096 "$@" >"$WORK/coord.out" 2>"$OUT/coordinator-$name.log" &
    local coord=$!
    local ready=0
    for _ in $(seq 600); do
        if "$YOCO" client --addr "http://127.0.0.1:$grpc" info 2>/dev/null |
            python3 -c 'import json,sys; i=json.load(sys.stdin); sys.exit(0 if len(i.get("groups",[]))==2 else 1)' 2>/dev/null; then
            ready=1
            break
        fi
        sleep 0.5
    done
    [ "$ready" = 1 ] || { echo "$name: the two groups did not form" >&2; tail -20 "$OUT/coordinator-$name.log" >&2; exit 1; }
    echo "== $name ($*)" >&2
    "$YOCO" client --addr "http://127.0.0.1:$grpc" bench-prefix --groups 2 --doc-tokens "$DOC" \
        --questions "$questions" --json >"$OUT/$name.json"
    curl -s "http://127.0.0.1:$http/metrics" | grep -E '^yoco_(prefix_disk|router)_' >"$OUT/$name.metrics" || true
    kill -TERM "$coord"
    wait "$coord" || true
}

RUNS=${RUNS:-cache-aware least-loaded disk prefilled}
for r in $RUNS; do
    case $r in
        cache-aware) run cache-aware 10 --route-policy cache-aware ;;
        least-loaded) run least-loaded 10 --route-policy least-loaded ;;
        disk) run disk 10 --route-policy cache-aware --prefix-disk-dir "$WORK/tier" --prefix-memory-mib 0 ;;
        prefilled) run prefilled 3 --no-prefix-cache ;;
        *) echo "unknown run $r" >&2; exit 2 ;;
    esac
done

python3 - "$OUT" "$DOC" <<'EOF' | tee "$OUT/table.md"
import json, statistics, sys
out, doc = sys.argv[1], int(sys.argv[2])
runs = [("cache-aware routing, memory", "cache-aware"), ("least-loaded routing, memory", "least-loaded"),
        ("cache-aware routing, disk tier only", "disk"), ("no prefix cache (prefilled)", "prefilled")]
print(f"{doc}-token document, 2 groups x 1 CPU worker (1 thread each), 10 questions of 32 tokens\n")
print("| configuration | Q1 TTFT s | Q2-Q10 TTFT s, median | max | cached tokens Q2-Q10 | served by |")
print("|---|---|---|---|---|---|")
for label, name in runs:
    try:
        r = json.load(open(f"{out}/{name}.json"))
    except FileNotFoundError:
        continue
    t, later = r["ttft_seconds"], r["ttft_seconds"][1:]
    cached = r["cached_tokens"][1:]
    hits = f"{min(cached)}-{max(cached)}" if cached else "-"
    print(f"| {label} | {t[0]:.2f} | {statistics.median(later):.3f} | {max(later):.3f} | {hits} | "
          f"{' '.join(r['served_by'])} |")
EOF
