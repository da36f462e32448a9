#!/usr/bin/env bash
# The patched llama.cpp built with ggml's Vulkan backend (GGML_VULKAN=ON), shared libraries
# in $WORK/build/bin, for LLAMA_CPP_LIB_PATH and `BACKEND=vulkan scripts/device_check.sh`.
# Nothing is installed, and `spindle-local setup` does not offer this backend yet (see
# DEV_BACKENDS in spindle_local/runtime/build.py).
#
#   bash scripts/build_vulkan.sh
#   VULKAN_INCLUDE_DIR=DIR bash scripts/build_vulkan.sh   # newer Vulkan headers than the system's
#
# Needs glslc, glslang's tools and the SPIR-V headers (Debian/Ubuntu: glslc glslang-tools
# spirv-headers libvulkan-dev), and Vulkan headers that define VK_EXT_layer_settings: Debian
# 12's 1.3.239 do not, so there VULKAN_INCLUDE_DIR names newer ones (a Vulkan SDK's include
# folder, or usr/include of a newer libvulkan-dev package, unpacked with dpkg-deb -x).
# About 12 minutes on two cores, most of it ggml-vulkan.cpp and the shaders.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${WORK:-${TMPDIR:-/tmp}/spindle-vulkan-build}"
JOBS="${JOBS:-$(nproc)}"
VPY="${VPY:-$PWD/.venv/bin/python}"
if [ -n "${VULKAN_INCLUDE_DIR:-}" ]; then
    export SPINDLE_CMAKE_ARGS="${SPINDLE_CMAKE_ARGS:-} -DVulkan_INCLUDE_DIR=$VULKAN_INCLUDE_DIR"
fi
mkdir -p "$WORK"
# shellcheck source=scripts/build_llama.sh
. scripts/build_llama.sh
build_llama vulkan Vulkan
