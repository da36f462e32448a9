#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and nvcc (BACKEND=cuda, the default) or
# with a Vulkan device (BACKEND=vulkan; Mesa's software device lavapipe serves on a machine
# without a GPU):
#   1. compile the patched llama.cpp for that backend (scripts/build_cuda.sh for the GPU's
#      architecture, or scripts/build_vulkan.sh);
#   2. load it in place of the installed runtime (LLAMA_CPP_LIB_PATH) and check that the
#      default model's layers, its KV cache and the SpindleKV store land on the GPU;
#   3. run the store, backend-plan, engine and family tests with every layer there;
#   4. measure `eval speed` at 8K tokens (spindle at 0.25 against the same library with an
#      empty store, whose graph is stock);
#   5. profile the same 8K prompt and 64 tokens (scripts/profile_engine.py): time in
#      llama_decode against plans and Python, with a store and with the full cache;
#   6. the same-backend controls (scripts/backend_controls.py): a store of every token
#      against the full cache, next to the full cache against itself with only the shapes
#      changed (two tokens at once, a larger context, flash attention, the CPU);
#   7. the session and question-later suites (EXTRA_TESTS), with what time is left.
# Prints a compact summary at the end; the logs stay in $OUT (default ./device_check).
#
#   make setup && bash scripts/device_check.sh      # about 8 minutes on 16 cores
#   CUDA_LIB_DIR=DIR bash scripts/device_check.sh    # with a build made beforehand (build_cuda.sh)
#   MODEL=shape ...                                    # a random model of the default's shape
#   BACKEND=vulkan [LIB_DIR=DIR] SPEED=0 bash scripts/device_check.sh
#                                     # Vulkan (LIB_DIR: a build_vulkan.sh build); SPEED=0 skips
#                                     # steps 4 and 5, which a software device makes long
#
# It needs a Python that imports spindle_local and its dependencies (VPY, default
# .venv/bin/python, else python3) and the default model in the cache: `make setup` gives
# both. Once the llama-cpp-python source is in the cache, nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-device_check}"
mkdir -p "$OUT"
BACKEND="${BACKEND:-cuda}"
VPY="${VPY:-.venv/bin/python}"
[ -x "$VPY" ] || VPY="$(command -v python3)"
TEST_TIMEOUT="${TEST_TIMEOUT:-300}"
status() { printf '%-30s %s\n' "$1" "$2" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"
case "$BACKEND" in
    cuda)
        ARCH="${CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .)}"
        ARCH="${ARCH:-90}"
        LIB_DIR="${LIB_DIR:-${CUDA_LIB_DIR:-}}"
        export WORK="${WORK:-${TMPDIR:-/tmp}/spindle-cuda-build}"
        build=(bash scripts/build_cuda.sh "$ARCH")
        label="build (sm_$ARCH)"
        status "gpu" "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
        ;;
    vulkan)
        LIB_DIR="${LIB_DIR:-}"
        export WORK="${WORK:-${TMPDIR:-/tmp}/spindle-vulkan-build}"
        build=(bash scripts/build_vulkan.sh)
        label="build (vulkan)"
        status "gpu" "$(vulkaninfo --summary 2>/dev/null | grep -m3 -E 'deviceName|deviceType|driverInfo' | awk -F= '{gsub(/^ +/, "", $2); printf "%s; ", $2}')"
        ;;
    *) echo "error: BACKEND must be cuda or vulkan, got '$BACKEND'" >&2; exit 2 ;;
esac
status "commit" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

t0=$(date +%s)
if [ -n "$LIB_DIR" ]; then
    # a build made beforehand (the build script's $WORK/build/bin, from this checkout)
    [ -e "$LIB_DIR/libggml-$BACKEND.so" ] || { status "build" "no libggml-$BACKEND.so in $LIB_DIR"; exit 1; }
    status "$label" "made beforehand: $LIB_DIR"
elif VPY="$VPY" JOBS="${JOBS:-$(nproc)}" "${build[@]}" > "$OUT/build.log" 2>&1; then
    status "$label" "ok in $(( $(date +%s) - t0 )) s"
else
    status "$label" "FAILED in $(( $(date +%s) - t0 )) s (tail of $OUT/build.log:)"
    tail -20 "$OUT/build.log" | tee -a "$OUT/summary.txt"
    tail -40 "$WORK/build.log" > "$OUT/build_tail.log" 2>/dev/null
    exit 1
fi
export LLAMA_CPP_LIB_PATH="${LIB_DIR:-$WORK/build/bin}"

# MODEL: the GGUF the placement, speed and profile steps read (default: the default model).
# MODEL=shape writes a random-weight model of the default model's shape instead, for a
# machine the model cannot be copied to (the tests still need the default model).
if [ "${MODEL:-}" = shape ]; then
    MODEL="$OUT/smollm2_shape.gguf"
    "$VPY" -c "from spindle_local.testing.tiny_gguf import write_tiny_llama as w; w('$MODEL', n_layer=30, n_embd=576, n_head=9, n_head_kv=3, head_dim=64, n_ff=1536, n_vocab=49152, n_ctx_train=16384, seed=1)"
    status "model" "random weights, SmolLM2-135M's shape: $MODEL"
fi
export MODEL="${MODEL:-}"
MODEL_ARGS=()
[ -n "$MODEL" ] && MODEL_ARGS=(--model "$MODEL")

# Placement: llama.cpp's own log lines say where the layers, the KV cache and the store went.
placed=$(SPINDLE_LLAMA_LOG=1 "$VPY" - 2> "$OUT/placement.log" <<'EOF'
import os

from spindle_local.eval.texts import load_text, prefix_tokens
from spindle_local.runtime.engine import Engine, EngineConfig
from spindle_local.runtime.model_files import default_model_path

cfg = EngineConfig(policy="spindle", kv_budget=0.25, max_tokens=4096)
eng = Engine(os.environ.get("MODEL") or str(default_model_path(fetch=False)), cfg)
toks = prefix_tokens(lambda t: eng.model.tokenize(t, add_special=False), load_text(None), 3000)
eng.feed(toks)
s = eng.refresh_stats()
print(f"3000 tokens: compressions={s.compressions} reserve_ratio={s.reserve_ratio:.3f} kv_bytes={s.kv_bytes}")
EOF
)
rc=$?
status "placement" "rc=$rc, $(grep -h -o -m1 'offloaded [0-9]*/[0-9]* layers to GPU' "$OUT/placement.log")"
grep -h -E '(CUDA0|Vulkan0) (KV|compute) buffer size|spindle.*(CUDA|Vulkan)|(CUDA|Vulkan).*spindle' "$OUT/placement.log" | head -4 | sed 's/^/  /' | tee -a "$OUT/summary.txt"
echo "$placed" | sed 's/^/  /' | tee -a "$OUT/summary.txt"
[ $rc -eq 0 ] || tail -5 "$OUT/placement.log" | sed 's/^/  /' | tee -a "$OUT/summary.txt"

t0=$(date +%s)
timeout "$TEST_TIMEOUT" "$VPY" -m pytest -q -p no:cacheprovider \
    tests/test_store.py tests/test_backend_plan.py tests/test_engine.py tests/test_families.py \
    > "$OUT/tests.log" 2>&1
rc=$?
status "tests (store,plan,engine,fam)" "rc=$rc, $(tail -1 "$OUT/tests.log") in $(( $(date +%s) - t0 )) s"
grep -E '^(FAILED|ERROR) ' "$OUT/tests.log" | head -15 | sed 's/^/  /' | tee -a "$OUT/summary.txt"

# The store's distance from the full cache, beside the full cache's distance from itself
# when only the arithmetic changes (the largest of the controls per prompt and setting).
t0=$(date +%s)
timeout "$TEST_TIMEOUT" "$VPY" scripts/backend_controls.py "${MODEL_ARGS[@]}" --families > "$OUT/controls.jsonl" 2> "$OUT/controls.log"
status "controls (store vs full)" "rc=$?, $(( $(date +%s) - t0 )) s"
"$VPY" - "$OUT/controls.jsonl" <<'PYEOF' | tee -a "$OUT/summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for key in sorted({(r["prompt"], r["flash"]) for r in rows}):
    rs = {r["run"]: r for r in rows if (r["prompt"], r["flash"]) == key}
    st = rs.pop("store", None)
    if st is None:
        continue
    worst = max(rs.values(), key=lambda r: r["kl"])
    print(f"  {key[0]:8s} fa={int(key[1])} store: max {st['max_abs']:.3g} kl {st['kl']:.2e} top1 {st['top1_same']}"
          f" | controls max {max(r['max_abs'] for r in rs.values()):.3g}, kl up to {worst['kl']:.2e} ({worst['run']})")
PYEOF

# Steps 4 and 5 (SPEED=0 skips them).
if [ "${SPEED:-1}" != 0 ]; then
t0=$(date +%s)
"$VPY" -m spindle_local.cli eval speed ${MODEL:+"$MODEL"} --context 8000 --gen 64 --reps 2 --policy spindle --kv-budget 0.25 --json \
    > "$OUT/speed.json" 2> "$OUT/speed.log"
status "eval speed 8K (spindle 0.25)" "rc=$?, $(( $(date +%s) - t0 )) s"
"$VPY" - "$OUT/speed.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:  # noqa: BLE001
    print(f"  no speed result ({e})")
    sys.exit(0)
for k in ("decode_tps", "decode_tps_stock", "decode_ratio", "prefill_tps", "prefill_tps_stock",
          "prefill_ratio", "compress_seconds", "compress_fraction_of_prefill", "reserve_ratio",
          "stock_library"):
    if k in r:
        v = r[k]
        print(f"  {k:30s} {v:.4g}" if isinstance(v, float) else f"  {k:30s} {v}")
EOF

# Where the time goes: the prompt and the generated tokens under cProfile, with a store and
# with the full cache (llama_decode against plans and the rest of the Python).
for pol in spindle full; do
    "$VPY" scripts/profile_engine.py "${MODEL_ARGS[@]}" --context 8000 --gen 64 --policy "$pol" --json \
        > "$OUT/profile_$pol.json" 2> "$OUT/profile_$pol.log"
    status "profile 8K ($pol)" "rc=$?"
    "$VPY" - "$OUT/profile_$pol.json" <<'PYEOF' | tee -a "$OUT/summary.txt"
import json, sys
try:
    r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except Exception as e:  # noqa: BLE001
    print(f"  no profile ({e})")
    sys.exit(0)
for phase in ("prefill", "decode"):
    p = r[phase]
    print(f"  {phase:8s} " + ", ".join(f"{k} {v:.3f}" for k, v in p.items() if v))
PYEOF
done
fi

EXTRA_TESTS="${EXTRA_TESTS-tests/test_session.py tests/test_question_later.py tests/test_read_hooks.py}"
if [ -n "$EXTRA_TESTS" ]; then
    t0=$(date +%s)
    # shellcheck disable=SC2086
    timeout "$TEST_TIMEOUT" "$VPY" -m pytest -q -p no:cacheprovider $EXTRA_TESTS > "$OUT/tests_extra.log" 2>&1
    rc=$?
    status "tests (extra)" "rc=$rc, $(tail -1 "$OUT/tests_extra.log") in $(( $(date +%s) - t0 )) s"
    grep -E '^(FAILED|ERROR) ' "$OUT/tests_extra.log" | head -15 | sed 's/^/  /' | tee -a "$OUT/summary.txt"
fi
