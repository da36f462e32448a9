#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and nvcc: build the CUDA runtime for that
# GPU's architecture, run the store, backend-plan and engine tests with every layer on the
# GPU, and measure `eval speed` at 8K tokens. Prints a compact summary at the end; the full
# logs stay in $OUT (default ./device_check).
#
#   bash scripts/device_check.sh            # about 8 minutes on 16 cores
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-device_check}"
mkdir -p "$OUT"
ARCH="${CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .)}"
ARCH="${ARCH:-90}"
export SPINDLE_BACKEND=cuda
export SPINDLE_CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$ARCH ${SPINDLE_CMAKE_ARGS:-}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

status() { printf '%-28s %s\n' "$1" "$2" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
status "gpu" "$(head -1 "$OUT/gpu.txt")"

t0=$(date +%s)
if make setup > "$OUT/setup.log" 2>&1; then
    status "build (sm_$ARCH)" "ok in $(( $(date +%s) - t0 )) s"
else
    status "build (sm_$ARCH)" "FAILED (tail of $OUT/setup.log:)"
    tail -20 "$OUT/setup.log" | tee -a "$OUT/summary.txt"
    exit 1
fi

t0=$(date +%s)
.venv/bin/python -m pytest -q -p no:cacheprovider tests/test_store.py tests/test_backend_plan.py tests/test_engine.py \
    > "$OUT/tests.log" 2>&1
rc=$?
status "tests (store, plan, engine)" "rc=$rc, $(tail -1 "$OUT/tests.log") in $(( $(date +%s) - t0 )) s"

t0=$(date +%s)
.venv/bin/spindle-local eval speed --context 8000 --gen 64 --reps 2 --policy spindle --kv-budget 0.25 --json \
    > "$OUT/speed.json" 2> "$OUT/speed.log"
status "eval speed 8K (spindle 0.25)" "rc=$?, $(( $(date +%s) - t0 )) s"
.venv/bin/python - "$OUT/speed.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:  # noqa: BLE001
    print(f"  no speed result ({e})")
    sys.exit(0)
for k in ("decode_tps", "decode_tps_stock", "decode_ratio", "prefill_tps", "prefill_tps_stock",
          "prefill_ratio", "compress_fraction_of_prefill", "reserve_ratio", "stock_library"):
    if k in r:
        print(f"  {k:24s} {r[k]}")
EOF
