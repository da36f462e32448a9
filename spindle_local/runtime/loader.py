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
    except (OSError, RuntimeError, AttributeError) as e:
        # OSError: the shared library is missing or broken; RuntimeError: llama-cpp-python's
        # loader gave up; AttributeError: a library without the symbols the bindings declare.
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RuntimeNotPatchedError(f"the llama.cpp runtime library failed to load ({first}); {_FIX}") from None
    if require_patch:
        from spindle_local.runtime import native

        native.native()
    return llama_cpp
