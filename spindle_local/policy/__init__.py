"""KV-cache compression policies (pure numpy + numba; no llama.cpp import).

Entry points: :func:`make_policy` with a :class:`PolicyConfig`, then
``policy.plan(layers, geometry, target_bytes)`` with one :class:`LayerInput` per layer.
The plan types and the byte accounting shared with the C++ store are in :mod:`.plan`.
"""

from .codebook import build_codebook, codebook_join
from .inputs import Geometry, LayerInput, PolicyConfig
from .plan import Codebook, HeadStore, LayerStore, full_cache_bytes, layer_store_bytes
from .policies import POLICY_NAMES, Policy, make_policy

__all__ = [
    "POLICY_NAMES",
    "Codebook",
    "Geometry",
    "HeadStore",
    "LayerInput",
    "LayerStore",
    "Policy",
    "PolicyConfig",
    "build_codebook",
    "codebook_join",
    "full_cache_bytes",
    "layer_store_bytes",
    "make_policy",
]
