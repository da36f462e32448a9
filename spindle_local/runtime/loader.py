"""Importing llama-cpp-python and making sure it is our patched build.

``import llama_cpp`` loads the shared library at import time, so any problem (not
installed, stock build without our hooks, a library from another version) shows up
here and becomes one line telling the user to run ``spindle-local setup``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from spindle_local.errors import RuntimeNotPatchedError

_FIX = "run `spindle-local setup` (or `make setup`) to build and install it"


def load_llama_cpp(*, require_patch: bool = True) -> ModuleType:
    """Import llama_cpp; with ``require_patch`` also check the spindle-local hooks are there."""
    try:
        llama_cpp = importlib.import_module("llama_cpp")
    except ImportError as e:
        raise RuntimeNotPatchedError(f"the llama.cpp runtime is not installed ({e}); {_FIX}") from None
    except OSError as e:  # the shared library failed to load
        raise RuntimeNotPatchedError(f"the llama.cpp runtime library failed to load ({e}); {_FIX}") from None
    if require_patch:
        from spindle_local.runtime import native

        native.check_runtime(llama_cpp.llama_cpp._lib)
    return llama_cpp
