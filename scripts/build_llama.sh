# Sourced by scripts/build_cuda.sh and scripts/build_vulkan.sh: configure and build the patched
# llama.cpp library (target `llama`, shared libraries in $WORK/build/bin) for one ggml backend.
# Expects VPY (a Python that imports spindle_local), WORK and JOBS to be set.
#
#   build_llama BACKEND LABEL [CMAKE_ARG...]
build_llama() {
    local backend=$1 label=$2 src args t0
    shift 2
    # the same source tree and CMake flags as `spindle-local setup --backend BACKEND`
    src=$("$VPY" -m spindle_local.runtime.build --backend "$backend" --source "$WORK/src") || return 1
    args=$("$VPY" -m spindle_local.runtime.build --backend "$backend" --cmake-args)
    echo "building $src ($label) with $JOBS jobs (log: $WORK/build.log)" >&2
    t0=$(date +%s)
    # shellcheck disable=SC2086
    cmake -S "$src" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON $args "$@" \
        > "$WORK/configure.log" 2>&1 || { tail -20 "$WORK/configure.log" >&2; return 1; }
    if cmake --build "$WORK/build" -j "$JOBS" --target llama > "$WORK/build.log" 2>&1; then
        echo "$label build ok ($(( $(date +%s) - t0 )) s): $WORK/build/bin"
    else
        grep -m 20 -E "error|Error" "$WORK/build.log" >&2
        echo "$label build FAILED; see $WORK/build.log" >&2
        return 1
    fi
}
