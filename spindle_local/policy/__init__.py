"""KV-cache compression policies (numpy, with numba kernels loaded at first use; no llama.cpp import).

Entry points: :func:`make_policy` with a preset name (``spindle``, ``snapkv``, ...; the
stages each is built from are in :mod:`.stages` and :mod:`.presets`), then
``policy.plan(layers, geometry, target_bytes)`` with one :class:`LayerInput` per layer, or
``policy.plan_into(source, geometry, target_bytes, install)`` with a :class:`LayerSource`
that hands out one layer at a time (what the engine uses: a plan then holds one layer's
vectors per planning thread, see :mod:`.sources`).
The plan types and the byte accounting shared with the C++ store are in :mod:`.plan`.
"""

import importlib
from typing import Any

# Names resolve on first use, so that importing one light module of the package (the stages,
# the plan types) does not load numba and every kernel with it.
_EXPORTS = {
    "build_codebook": "codebook",
    "Geometry": "inputs",
    "LayerInput": "inputs",
    "Codebook": "plan",
    "HeadStore": "plan",
    "LayerStore": "plan",
    "full_cache_bytes": "plan",
    "layer_store_bytes": "plan",
    "POLICY_NAMES": "policies",
    "Policy": "policies",
    "make_policy": "policies",
    "PRESETS": "presets",
    "Stages": "presets",
    "preset": "presets",
    "PlanContext": "stages",
    "LayerMeta": "sources",
    "LayerSource": "sources",
    "ListSource": "sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
