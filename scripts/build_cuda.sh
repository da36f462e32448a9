#!/usr/bin/env bash
# Compile-only check of the CUDA runtime: the patched llama.cpp (this checkout's patches/)
# built with GGML_CUDA=ON for one GPU architecture, with the nvcc on PATH. Nothing is
# installed: a machine without a GPU can run it, so a patch that breaks the CUDA build is
# caught without one. Slow (the CUDA kernels), so it is not part of the regular tests.
#
#   bash scripts/build_cuda.sh [ARCH]        # ARCH: e.g. 90 (H100/H200), 89 (RTX 40xx); default 90
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH="${1:-90}"
WORK="${WORK:-${TMPDIR:-/tmp}/spindle-cuda-build}"
JOBS="${JOBS:-$(nproc)}"
command -v nvcc >/dev/null || { echo "error: nvcc not found on PATH" >&2; exit 2; }
# ggml's CUDA backend links cuBLAS: a toolkit with nvcc alone does not configure
cuda_root="${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}"
if ! ls "$cuda_root"/include/cublas_v2.h /usr/local/cuda/include/cublas_v2.h /usr/include/cublas_v2.h >/dev/null 2>&1 \
        && ! ls "$cuda_root"/targets/*/include/cublas_v2.h >/dev/null 2>&1; then
    echo "error: no cuBLAS headers next to nvcc ($cuda_root); ggml's CUDA backend needs the CUDA toolkit's cuBLAS" >&2
    exit 2
fi
VPY="${VPY:-.venv/bin/python}"

src=$("$VPY" - "$WORK" <<'EOF'
import sys
from pathlib import Path
from spindle_local.runtime.build import BuildConfig, fetch_sdist, patch_files, prepare_source
cfg = BuildConfig(backend="cuda")
root = prepare_source(fetch_sdist(cfg.version), patch_files(), Path(sys.argv[1]) / "src", cfg.key(patch_files()))
print(root / "vendor" / "llama.cpp")
EOF
)
args=$("$VPY" -c 'from spindle_local.runtime.build import BuildConfig; print(" ".join(BuildConfig(backend="cuda").cmake_args()))')
echo "building $src for sm_$ARCH with $JOBS jobs (log: $WORK/build.log)" >&2
t0=$(date +%s)
# shellcheck disable=SC2086
cmake -S "$src" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$ARCH" $args > "$WORK/configure.log" 2>&1 \
    || { tail -20 "$WORK/configure.log" >&2; exit 1; }
if cmake --build "$WORK/build" -j "$JOBS" --target llama > "$WORK/build.log" 2>&1; then
    echo "CUDA build ok (sm_$ARCH, $(( $(date +%s) - t0 )) s): $(ls "$WORK"/build/bin/libggml-cuda.so* | head -1)"
else
    grep -m 20 -E "error|Error" "$WORK/build.log" >&2
    echo "CUDA build FAILED (sm_$ARCH); see $WORK/build.log" >&2
    exit 1
fi
