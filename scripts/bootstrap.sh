#!/usr/bin/env bash
# Set up everything spindle-local needs, idempotently, and fast when already done:
#   1. a virtualenv in .venv (override with VENV=...)
#   2. the patched llama.cpp runtime (built once, cached in ~/.cache/spindle-local)
#   3. spindle-local itself (editable) with its dependencies
#   4. the default model (fetched once with pip, cached)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
    echo "error: spindle-local needs Python 3.10 or newer ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtualenv $VENV ..." >&2
    "$PYTHON" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

# The patched runtime first: installing the package afterwards then finds
# llama-cpp-python==0.3.36 satisfied and never builds a stock copy.
"$VPY" -m spindle_local.runtime.build ${SPINDLE_BACKEND:+--backend "$SPINDLE_BACKEND"}

stamp="$VENV/.spindle-deps-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "installing spindle-local and its dependencies ..." >&2
    "$VPY" -m pip install -q --disable-pip-version-check -e '.[test]'
    rm -f "$VENV"/.spindle-deps-*
    touch "$stamp"
fi

"$VENV/bin/spindle-local" setup ${SPINDLE_BACKEND:+--backend "$SPINDLE_BACKEND"}
