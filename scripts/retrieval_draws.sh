#!/usr/bin/env bash
# Retrieval over several draws, at one commit: the figures behind the question-later targets.
#
#   multi    three named keys in one document, asked in turn (`eval needle --protocol multi`),
#            lengths 1,000 / 3,000 / 6,000, two documents a length, one draw per seed;
#   ruler    the RULER-style tasks at 2,000 tokens, four prompts a task and protocol;
#   later    one key, question asked after the document (`--protocol later`), the bench
#            grid's lengths and depths, two prompts a cell.
#
# Each draw is one `eval` process on one thread; JOBS of them run side by side (default:
# 2). Rows go to $OUT/<part>_s<seed>.jsonl; at the end scripts/pool_retrieval.py pools
# every part. A part whose row file exists is not run again (delete it to redo it).
#
#   bash scripts/retrieval_draws.sh multi "0 1 2 3 4 6 7 8 9 10 11"
#   BUDGETS=0.25,0.15 bash scripts/retrieval_draws.sh later "0 1"
#   bash scripts/retrieval_draws.sh ruler "0 1 3 4 5"
#
# Environment: OUT (runs/retrieval), BUDGETS (0.25), POLICIES (spindle), JOBS (2), BIN, and
# SETS: extra `--set KEY=VALUE` settings, space-separated, e.g.
#   SETS="allocator.min_slots=256 allocator.min_cap=0.75" bash scripts/retrieval_draws.sh later "0 1"
set -euo pipefail
cd "$(dirname "$0")/.."
PART="${1:?usage: retrieval_draws.sh multi|ruler|later \"SEEDS\"}"
SEEDS="${2:?usage: retrieval_draws.sh multi|ruler|later \"SEEDS\"}"
OUT="${OUT:-runs/retrieval}"
BUDGETS="${BUDGETS:-0.25}"
POLICIES="${POLICIES:-spindle}"
JOBS="${JOBS:-2}"
BIN="${BIN:-.venv/bin/spindle-local}"
sets=()
for kv in ${SETS:-}; do sets+=(--set "$kv"); done
mkdir -p "$OUT"

case "$PART" in
    multi) args=(needle --protocol multi --lengths 1000,3000,6000 --samples 2) ;;
    later) args=(needle --protocol later --lengths 1000,3000,6000 --depths 0.1,0.5,0.9 --samples 2) ;;
    ruler) args=(ruler --lengths 2000 --samples 4 --protocol both) ;;
    *) echo "error: unknown part '$PART' (multi, ruler or later)" >&2; exit 2 ;;
esac

run_one() {  # seed
    local rows="$OUT/${PART}_s$1.jsonl"
    [ -s "$rows" ] && return 0
    "$BIN" eval "${args[@]}" --seed "$1" --threads 1 --policy "$POLICIES" --kv-budget "$BUDGETS" \
        ${sets[@]+"${sets[@]}"} --out "$rows.part" > "$OUT/${PART}_s$1.log" 2>&1 && mv "$rows.part" "$rows"
}

running=0
for s in $SEEDS; do
    run_one "$s" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then
        wait -n || echo "warning: a draw failed (see $OUT/${PART}_s*.log)" >&2
        running=$((running - 1))
    fi
done
wait
.venv/bin/python scripts/pool_retrieval.py "$OUT/${PART}"_s*.jsonl
