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
VPY="${VPY:-$PWD/.venv/bin/python}"
# ggml's CUDA backend links cuBLAS. A toolkit installed without it (nvcc and the runtime
# only) gets NVIDIA's own cuBLAS (the `nvidia-cublas` wheel: headers and shared libraries),
# installed in this Python or else fetched from PyPI, in the cache, handed to CMake.
cuda_root="${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}"
extra=()
if ! ls "$cuda_root"/include/cublas_v2.h /usr/local/cuda/include/cublas_v2.h /usr/include/cublas_v2.h >/dev/null 2>&1 \
        && ! ls "$cuda_root"/targets/*/include/cublas_v2.h >/dev/null 2>&1; then
    cublas="${XDG_CACHE_HOME:-$HOME/.cache}/spindle-local/cublas"
    # an `nvidia-cublas` wheel already installed in this Python (PyTorch's images carry one)
    # serves as well as a download: its folder is linked into the cache, never written to
    installed=$("$VPY" - <<'EOF' 2>/dev/null
import glob, os, sys
for base in sys.path:
    for h in sorted(glob.glob(os.path.join(base, "nvidia", "**", "include", "cublas_v2.h"), recursive=True)):
        root = os.path.dirname(os.path.dirname(h))
        if glob.glob(os.path.join(root, "lib", "libcublas.so*")):
            print(root)
            sys.exit(0)
EOF
)
    if [ -n "$installed" ]; then
        rm -rf "$cublas" && mkdir -p "$cublas/lib"
        ln -s "$installed/include" "$cublas/include"
        for so in "$installed"/lib/lib*.so.*; do ln -s "$so" "$cublas/lib/"; done
    elif [ ! -f "$cublas/include/cublas_v2.h" ]; then
        echo "no cuBLAS next to nvcc ($cuda_root): fetching NVIDIA's nvidia-cublas wheel into $cublas" >&2
        rm -rf "$cublas.tmp" && mkdir -p "$cublas.tmp"
        "$VPY" -m pip download --quiet --no-deps --only-binary=:all: -d "$cublas.tmp" nvidia-cublas >&2 \
            || { echo "error: no cuBLAS headers next to nvcc and the nvidia-cublas wheel could not be fetched" >&2; exit 2; }
        (cd "$cublas.tmp" && "$VPY" -m zipfile -e ./*.whl unpacked)
        sub=$(dirname "$(dirname "$(ls "$cublas.tmp"/unpacked/nvidia/*/include/cublas_v2.h | head -1)")")
        rm -rf "$cublas" && mv "$sub" "$cublas" && rm -rf "$cublas.tmp"
    fi
    # CMake looks for the unversioned names
    for so in "$cublas"/lib/lib*.so.*; do ln -sf "$(basename "$so")" "${so%%.so.*}.so"; done
    extra=(-DCMAKE_LIBRARY_PATH="$cublas/lib" -DCMAKE_CUDA_FLAGS="-I$cublas/include" -DCMAKE_CXX_FLAGS="-I$cublas/include")
fi

# ggml's CUDA backend also links the driver library (libcuda.so), which comes with the GPU
# driver, not the toolkit. A driver that installed only libcuda.so.1 is linked by that name;
# without a driver or the toolkit's stubs, an empty stand-in is linked: that build is only
# compiled, never loaded.
driver=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}')
driver="${driver:-$(ls /usr/local/nvidia/lib64/libcuda.so.1 /usr/lib/x86_64-linux-gnu/libcuda.so.1 /usr/lib64/libcuda.so.1 2>/dev/null | head -1 || true)}"
if ldconfig -p 2>/dev/null | grep -q 'libcuda\.so ' || ls "$cuda_root"/lib64/stubs/libcuda.so "$cuda_root"/targets/*/lib/stubs/libcuda.so >/dev/null 2>&1; then
    :
elif [ -n "$driver" ]; then
    extra+=(-DCUDA_cuda_driver_LIBRARY="$driver")
else
    stub="$WORK/driver-stub/libcuda.so"
    mkdir -p "$(dirname "$stub")"
    # named as the driver's library is (libcuda.so.1), so that the build loads where a driver is
    echo 'void spindle_cuda_driver_stub(void) {}' | cc -shared -fPIC -Wl,-soname,libcuda.so.1 -x c - -o "$stub"
    # recorded as needed although it defines nothing, so the built library loads the driver
    extra+=(-DCUDA_cuda_driver_LIBRARY="$stub" -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--no-as-needed)
    echo "no CUDA driver library on this machine: linking an empty stand-in named libcuda.so.1" >&2
fi

mkdir -p "$WORK"
# shellcheck source=scripts/build_llama.sh
. scripts/build_llama.sh
build_llama cuda "CUDA sm_$ARCH" -DCMAKE_CUDA_ARCHITECTURES="$ARCH" "${extra[@]}"
