"""KV-cache compression policies (pure numpy + numba; no llama.cpp import).

Entry points: :func:`make_policy` with a preset name (``spindle``, ``snapkv``, ...; the
stages each is built from are in :mod:`.stages` and :mod:`.presets`), then
``policy.plan(layers, geometry, target_bytes)`` with one :class:`LayerInput` per layer, or
``policy.plan_into(source, geometry, target_bytes, install)`` with a :class:`LayerSource`
that hands out one layer at a time (what the engine uses: a plan then holds one layer's
vectors per planning thread, see :mod:`.sources`).
The plan types and the byte accounting shared with the C++ store are in :mod:`.plan`.
"""

from .codebook import build_codebook
from .inputs import Geometry, LayerInput
from .plan import Codebook, HeadStore, LayerStore, full_cache_bytes, layer_store_bytes
from .policies import POLICY_NAMES, Policy, make_policy
from .presets import PRESETS, Stages, preset
from .stages import PlanContext
from .sources import LayerMeta, LayerSource, ListSource

__all__ = [
    "POLICY_NAMES",
    "Codebook",
    "Geometry",
    "HeadStore",
    "LayerInput",
    "LayerMeta",
    "LayerSource",
    "LayerStore",
    "ListSource",
    "Policy",
    "PRESETS",
    "PlanContext",
    "Stages",
    "build_codebook",
    "full_cache_bytes",
    "layer_store_bytes",
    "make_policy",
    "preset",
]
