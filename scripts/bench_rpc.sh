#!/usr/bin/env bash
# Decode and compression speed with the layers on ggml RPC servers on loopback: the full
# cache and `spindle` at one budget, with every layer on the local CPU, on one server and
# split over two. Each server is a `spindle-local rpc-server` of this checkout, started
# here and stopped at the end. Rows go to $OUT/{local,one,two}.jsonl (one `eval speed`
# line per configuration, with provenance; stock llama.cpp is measured locally in each
# run); a table is printed.
#
#   bash scripts/bench_rpc.sh [CONTEXT] [BUDGET]     # defaults: 4000 tokens, 0.25
set -euo pipefail
cd "$(dirname "$0")/.."
CONTEXT="${1:-4000}"
BUDGET="${2:-0.25}"
OUT="${OUT:-runs/rpc}"
REPS="${REPS:-2}"
THREADS="${THREADS:-2}"
BIN="${BIN:-.venv/bin/spindle-local}"
PY="${PY:-.venv/bin/python}"
mkdir -p "$OUT"
rm -f "$OUT"/local.jsonl "$OUT"/one.jsonl "$OUT"/two.jsonl
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

start_server() {  # port
    "$BIN" rpc-server --port "$1" --threads "$THREADS" > "$OUT/server-$1.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.2
    done
    echo "error: rpc-server on port $1 did not start (see $OUT/server-$1.log)" >&2
    exit 1
}

run() {  # label, extra options...
    local label="$1"; shift
    echo "== $label" >&2
    "$BIN" eval speed --context "$CONTEXT" --gen 64 --reps "$REPS" --threads "$THREADS" \
        --policy full,spindle --kv-budget "$BUDGET" --out "$OUT/$label.jsonl" "$@" > /dev/null
}

run local
start_server 50152
run one --rpc 127.0.0.1:50152
start_server 50153
run two --rpc 127.0.0.1:50152,127.0.0.1:50153

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
print(f"{'servers':8} {'config':14} {'decode tok/s':>12} {'prefill tok/s':>13} {'compress s':>10} {'reserve':>8}")
for servers in ("local", "one", "two"):
    for line in (Path(sys.argv[1]) / f"{servers}.jsonl").read_text().splitlines():
        r = json.loads(line)
        print(f"{servers:8} {r['label']:14} {r['decode_tps']:12.1f} {r['prefill_tps']:13.1f} "
              f"{r['compress_seconds']:10.2f} {r.get('reserve_ratio') or 1.0:8.3f}")
    print(f"{servers:8} {'stock (local)':14} {r['decode_tps_stock']:12.1f} {r['prefill_tps_stock']:13.1f}")
EOF
