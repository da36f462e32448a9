"""Test helpers: tiny random-weight llama GGUF models and a numpy reference forward.

``tiny_gguf.write_tiny_llama`` writes the models, ``reference.ReferenceModel`` runs
them in numpy (optionally over an external prefix K/V with per-query-head masks), and
``llama_oracle.LlamaOracle`` runs them in llama.cpp with token ids fed directly.
"""

from spindle_local.testing.reference import PrefixKV, ReferenceModel, ReferenceOutput, rope, unrope
from spindle_local.testing.tiny_gguf import TinySpec, write_tiny_llama

__all__ = [
    "PrefixKV",
    "ReferenceModel",
    "ReferenceOutput",
    "TinySpec",
    "rope",
    "unrope",
    "write_tiny_llama",
]
