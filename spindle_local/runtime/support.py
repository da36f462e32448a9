"""Which model architectures spindle-local compresses, which run with the full cache only, and why.

Decided from the GGUF metadata before anything loads (``spindle-local info`` prints it).
*Compressed*: attention goes through the patch's hooks as plain softmax attention over a
regular KV cache, and the family is covered by the structural tests (tiny random models
of its exact tensor layout: lossless move, codebook, budget). *Full cache only*: the model
loads and chats, but its attention has something the store path does not reproduce yet
(soft-capping, sinks, chunked or compressed latent attention, sliding windows outside the
interleaved layout of Gemma 3) or the family is not covered
by those tests. *Refused*: the model keeps a recurrent state instead of (or besides) a KV
cache; spindle-local has nothing to compress there and does not run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

# Tested through tests/test_families.py (llama also covers Mistral GGUFs, written as llama).
# gemma3: the global layers are compressed, the sliding-window layers keep llama.cpp's window.
COMPRESSED_ARCHS = frozenset({"llama", "qwen2", "qwen3", "phi3", "gemma3"})

# Known attention variants the store path does not handle yet, with the reason shown.
_FULL_ONLY = {
    "gemma3n": "interleaved sliding-window attention",
    "gemma2": "sliding-window attention with soft-capping",
    "cohere2": "interleaved sliding-window attention",
    "llama4": "chunked attention",
    "gpt-oss": "attention sinks and sliding windows",
    "grok": "attention soft-capping",
    "deepseek2": "compressed latent attention (MLA)",
    "deepseek3": "compressed latent attention (MLA)",
    "kimi-k2": "compressed latent attention (MLA)",
    "minicpm3": "compressed latent attention (MLA)",
}

# Recurrent and hybrid models: their per-sequence state is not (only) a KV cache.
_REFUSED = {
    "mamba": "a recurrent state-space model",
    "mamba2": "a recurrent state-space model",
    "rwkv6": "a recurrent model",
    "rwkv6qwen2": "a recurrent model",
    "rwkv7": "a recurrent model",
    "arwkv7": "a recurrent model",
    "jamba": "a hybrid recurrent/attention model",
    "falcon-h1": "a hybrid recurrent/attention model",
    "granitehybrid": "a hybrid recurrent/attention model",
    "plamo2": "a hybrid recurrent/attention model",
    "lfm2": "a hybrid convolution/attention model",
    "nemotron_h": "a hybrid recurrent/attention model",
    "qwen3next": "a hybrid recurrent/attention model",
}


@dataclass(frozen=True)
class Support:
    """How spindle-local runs one architecture: ``kind`` and a reason for anything but compressed."""

    architecture: str
    kind: Literal["compressed", "full", "refused"]
    reason: str = ""

    def describe(self) -> str:
        """One line for ``info``."""
        if self.kind == "compressed":
            return "compressed (all policies)"
        if self.kind == "full":
            return f"full cache only ({self.reason})"
        return f"not supported ({self.reason})"

    def refusal(self) -> str:
        return f"{self.architecture} models are not supported: {self.reason}, with no KV cache to compress"

    def full_only(self) -> str:
        return (f"{self.architecture} models run with --policy full only for now ({self.reason}: "
                f"the compressed store does not handle it yet)")


def check_not_refused(arch: str) -> None:
    """One-line ModelError for an architecture spindle-local does not run (read_meta calls it,
    so every command refuses such a file before anything loads)."""
    if arch in _REFUSED:
        from spindle_local.errors import ModelError

        raise ModelError(Support(arch, "refused", _REFUSED[arch]).refusal())


def model_support(meta: Any) -> Support:
    """The :class:`Support` of a model from its metadata (``gguf_meta.ModelMeta``)."""
    arch = str(meta.architecture)
    if arch in _REFUSED:
        return Support(arch, "refused", _REFUSED[arch])
    if arch in _FULL_ONLY:
        return Support(arch, "full", _FULL_ONLY[arch])
    if arch in COMPRESSED_ARCHS:
        return Support(arch, "compressed")
    if getattr(meta, "sliding_window", None):
        return Support(arch, "full", "sliding-window attention")
    return Support(arch, "full", "an architecture the structural tests do not cover")
