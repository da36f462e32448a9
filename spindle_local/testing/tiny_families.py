"""Tiny random-weight GGUF models of the common model families, for structural tests.

:func:`write_tiny_family` writes a model whose tensors and metadata are laid out the
way real GGUFs of that family are (the names and shapes llama.cpp's loader requires
for the architecture), with random f32 weights scaled like
:func:`spindle_local.testing.tiny_gguf.write_tiny_llama`'s: the residual stream stays
O(1), attention scores ``q.k / sqrt(d)`` have a standard deviation of about
``qk_scale`` (peaky attention) and logits spread over a few units.

Families and what each adds to the plain llama layout (token embedding, RMS norms,
separate Q/K/V/O projections, SwiGLU FFN with ``ffn_gate``/``ffn_up``/``ffn_down``,
untied ``output``):

``llama``
    Llama 3.1: architecture ``llama``, RoPE NORM (adjacent pairs) with base 500,000
    and Llama-3 RoPE scaling carried as the ``rope_freqs.weight`` tensor (one
    frequency divisor per rotated pair, computed from ``factor``,
    ``low_freq_factor``, ``high_freq_factor`` and the original context as the HF
    converter does); llama.cpp applies it to Q and K of every layer.
``qwen2``
    Architecture ``qwen2``: biases on Q, K and V (``attn_q.bias`` ...), RoPE NEOX
    (halves rotated together). The loader sizes Q and O as ``n_embd``, so
    ``n_embd == n_head * head_dim`` is required.
``qwen3``
    Architecture ``qwen3``: per-head RMS norms of Q and K before RoPE
    (``attn_q_norm``/``attn_k_norm``, ``[head_dim]``), RoPE NEOX, explicit head size
    (``n_embd`` need not equal ``n_head * head_dim``).
``phi3``
    Architecture ``phi3``: one fused projection ``attn_qkv`` (rows Q, then K, then V)
    and gate and up fused in ``ffn_up`` (``[2 * n_ff]`` rows, gate first; no
    ``ffn_gate``), RoPE NEOX; the graph scales Q by ``1/sqrt(head_dim)`` before the
    attention (whose own scale is 1). ``n_embd == n_head * head_dim`` is required.
``mistral``
    Mistral 7B as its GGUFs are written: architecture ``llama`` (llama.cpp's
    ``mistral3`` is Mistral Small 3.x / Ministral, not plain Mistral 7B), RoPE NORM
    with base 1,000,000 and no ``rope_freqs``, a 32k trained context. Structurally a
    plain llama; it differs from ``llama`` above only in the RoPE.
``gemma3``
    Architecture ``gemma3``: interleaved sliding-window attention (``n_swa`` and a
    ``sliding_window_pattern``: with pattern ``p`` layer ``il`` is a sliding-window
    layer unless ``il % p == p - 1``), local layers with their own RoPE base
    (``rope.freq_base_swa``), Q/K RMS norms, post-attention and post-FFN norms
    (``post_attention_norm``/``post_ffw_norm``), GELU-gated FFN, embeddings scaled by
    ``sqrt(n_embd)`` in the graph (the stored table is ``1/sqrt(n_embd)`` of the
    other families'), tied output (no ``output.weight``), RoPE NEOX and the attention
    scale ``1/sqrt(head_dim)`` applied to Q by the graph.

All files use the minimal SentencePiece-style vocabulary of
:func:`spindle_local.testing.tiny_gguf._vocab`; callers feed token ids directly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spindle_local.testing.tiny_gguf import TinySpec, _vocab, add_hparams, add_vocab, write_and_close

__all__ = ["FAMILIES", "FamilySpec", "llama3_rope_factors", "write_tiny_family"]

#: The families :func:`write_tiny_family` writes.
FAMILIES = ("llama", "qwen2", "qwen3", "phi3", "mistral", "gemma3")

#: GGUF ``general.architecture`` of each family.
ARCHITECTURE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "mistral": "llama",
                "gemma3": "gemma3"}

#: RoPE variant llama.cpp uses for each architecture ("norm": adjacent pairs, "neox": halves).
ROPE_TYPE = {"llama": "norm", "qwen2": "neox", "qwen3": "neox", "phi3": "neox", "mistral": "norm",
             "gemma3": "neox"}

# Per family: (RoPE base, trained context, RMS epsilon), as the released models write them.
_DEFAULTS = {
    "llama": (500_000.0, 131_072, 1e-5),
    "qwen2": (1_000_000.0, 32_768, 1e-6),
    "qwen3": (1_000_000.0, 40_960, 1e-6),
    "phi3": (10_000.0, 4_096, 1e-5),
    "mistral": (1_000_000.0, 32_768, 1e-5),
    "gemma3": (1_000_000.0, 131_072, 1e-6),
}

#: Llama 3.1's ``rope_scaling`` (``rope_type: llama3``).
LLAMA3_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class FamilySpec(TinySpec):
    """Hyper-parameters of a model written by :func:`write_tiny_family`.

    ``rope_factors`` are the ``rope_freqs.weight`` divisors (``llama`` only), ``n_swa``
    the sliding window and ``swa_layers`` the layers that use it (``gemma3`` only),
    ``rope_base_swa`` the RoPE base of those layers.
    """

    family: str = "llama"
    architecture: str = "llama"
    rope_type: str = "norm"
    rope_factors: tuple[float, ...] | None = None
    n_swa: int = 0
    swa_layers: tuple[int, ...] = ()
    rope_base_swa: float | None = None


def llama3_rope_factors(head_dim: int, base: float, *, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """The ``rope_freqs.weight`` tensor of a Llama 3.1 GGUF: one divisor per rotated pair.

    Pairs whose wavelength is shorter than ``original / high_freq_factor`` keep their
    frequency (1), those longer than ``original / low_freq_factor`` are slowed by
    ``factor``; in between the divisor is interpolated smoothly.
    """
    old = float(original_max_position_embeddings)
    low_wavelen, high_wavelen = old / low_freq_factor, old / high_freq_factor
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / base ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def write_tiny_family(
    path: str | os.PathLike[str],
    family: str,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int = 16,
    n_ff: int = 128,
    n_vocab: int = 256,
    seed: int = 0,
    n_ctx_train: int | None = None,
    rope_base: float | None = None,
    rms_eps: float | None = None,
    qk_scale: float = 4.0,
    rope_scaling: dict | None = None,
    n_swa: int = 64,
    swa_pattern: int = 2,
    rope_base_swa: float = 10_000.0,
) -> FamilySpec:
    """Write a random-weight GGUF of ``family`` (one of :data:`FAMILIES`) to ``path``; return its spec.

    ``n_ctx_train``, ``rope_base`` and ``rms_eps`` default to the family's released
    values. ``qk_scale`` is the target standard deviation of the attention scores.
    ``rope_scaling`` overrides :data:`LLAMA3_ROPE_SCALING` (``llama``). ``n_swa``,
    ``swa_pattern`` and ``rope_base_swa`` shape ``gemma3``'s sliding-window layers.
    """
    import gguf

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if n_head % n_head_kv:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_head_kv ({n_head_kv})")
    if head_dim % 2:
        raise ValueError("head_dim must be even (RoPE rotates pairs)")
    if n_vocab < 4:
        raise ValueError("n_vocab must be >= 4")
    if family in ("qwen2", "phi3") and n_embd != n_head * head_dim:
        raise ValueError(f"{family} needs n_embd == n_head * head_dim ({n_head * head_dim}), got {n_embd}")
    if family == "gemma3" and (n_swa < 1 or swa_pattern < 1):
        raise ValueError("gemma3 needs n_swa >= 1 and swa_pattern >= 1")

    base_default, ctx_default, eps_default = _DEFAULTS[family]
    rope_base = float(base_default if rope_base is None else rope_base)
    n_ctx_train = int(ctx_default if n_ctx_train is None else n_ctx_train)
    rms_eps = float(eps_default if rms_eps is None else rms_eps)
    arch = ARCHITECTURE[family]

    path = Path(path)
    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight(n: int, scale: float = 1.0) -> np.ndarray:
        # Near ``scale``, not exactly, so a wrong norm-weight application is caught.
        return (scale * (1.0 + 0.1 * rng.standard_normal(n))).astype(np.float32)

    q_dim = n_head * head_dim
    kv_dim = n_head_kv * head_dim
    s_qk = float(np.sqrt(qk_scale / n_embd))
    s_in = 1.0 / np.sqrt(n_embd)
    branch = 0.5
    qk_norms = family in ("qwen3", "gemma3")

    w = gguf.GGUFWriter(str(path), arch)
    add_hparams(w, f"spindle-tiny-{family}", n_ctx_train=n_ctx_train, n_embd=n_embd, n_layer=n_layer, n_ff=n_ff,
                n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, rope_base=rope_base, rms_eps=rms_eps,
                n_vocab=n_vocab, head_size=family not in ("qwen2", "phi3"))  # these derive it from n_embd / n_head

    swa_layers: tuple[int, ...] = ()
    if family == "gemma3":
        w.add_sliding_window(n_swa)
        w.add_sliding_window_pattern(swa_pattern)
        w.add_rope_freq_base_swa(rope_base_swa)
        swa_layers = tuple(il for il in range(n_layer) if il % swa_pattern < swa_pattern - 1)

    tokens, scores, types = _vocab(n_vocab)
    if family == "phi3":
        # Phi-3 vocabularies end with control tokens; llama.cpp's vocab loader looks up
        # <|endoftext|> for models named phi3.
        tokens[-1], types[-1], scores[-1] = b"<|endoftext|>", int(gguf.TokenType.CONTROL), 0.0
    add_vocab(w, tokens, scores, types)

    rope_factors = None
    if family == "llama":
        rs = dict(LLAMA3_ROPE_SCALING, **(rope_scaling or {}))
        factors = llama3_rope_factors(head_dim, rope_base, **rs)
        rope_factors = tuple(float(f) for f in factors)
        w.add_tensor("rope_freqs.weight", factors)

    # numpy shape = reversed ggml ne: a [out, in] array is a ggml {in, out} matrix.
    if family == "gemma3":
        # the graph multiplies the embeddings by sqrt(n_embd): stored at 1/sqrt(n_embd), unit RMS inside
        w.add_tensor("token_embd.weight", normal((n_vocab, n_embd), s_in))
    else:
        w.add_tensor("token_embd.weight", normal((n_vocab, n_embd), 1.0))

    for il in range(n_layer):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", norm_weight(n_embd))
        # With Q/K norms the projections' scale is normalised away; the norm weights set the scores.
        s_q = s_in if qk_norms else s_qk
        wq = normal((q_dim, n_embd), s_q)
        wk = normal((kv_dim, n_embd), s_q)
        wv = normal((kv_dim, n_embd), s_in)
        if family == "phi3":
            w.add_tensor(p + "attn_qkv.weight", np.concatenate([wq, wk, wv], axis=0))
        else:
            w.add_tensor(p + "attn_q.weight", wq)
            w.add_tensor(p + "attn_k.weight", wk)
            w.add_tensor(p + "attn_v.weight", wv)
        if family == "qwen2":
            elem = float(np.sqrt(qk_scale))  # RMS of a Q/K element for unit-RMS input
            w.add_tensor(p + "attn_q.bias", normal((q_dim,), 0.3 * elem))
            w.add_tensor(p + "attn_k.bias", normal((kv_dim,), 0.3 * elem))
            w.add_tensor(p + "attn_v.bias", normal((kv_dim,), 0.3))
        if qk_norms:
            w.add_tensor(p + "attn_q_norm.weight", norm_weight(head_dim, float(np.sqrt(qk_scale))))
            w.add_tensor(p + "attn_k_norm.weight", norm_weight(head_dim, float(np.sqrt(qk_scale))))
        if family == "gemma3":
            # post-norms fix each branch's RMS to their weight
            w.add_tensor(p + "attn_output.weight", normal((n_embd, q_dim), 1.0 / np.sqrt(q_dim)))
            w.add_tensor(p + "post_attention_norm.weight", norm_weight(n_embd, branch))
        else:
            w.add_tensor(p + "attn_output.weight", normal((n_embd, q_dim), branch / np.sqrt(q_dim)))
        w.add_tensor(p + "ffn_norm.weight", norm_weight(n_embd))
        gate = normal((n_ff, n_embd), s_in)
        up = normal((n_ff, n_embd), s_in)
        if family == "phi3":
            w.add_tensor(p + "ffn_up.weight", np.concatenate([gate, up], axis=0))
        else:
            w.add_tensor(p + "ffn_gate.weight", gate)
            w.add_tensor(p + "ffn_up.weight", up)
        if family == "gemma3":
            w.add_tensor(p + "ffn_down.weight", normal((n_embd, n_ff), 1.0 / np.sqrt(n_ff)))
            w.add_tensor(p + "post_ffw_norm.weight", norm_weight(n_embd, branch))
        else:
            # silu(g)*u has RMS ~0.5 for unit g, u; scale down accordingly.
            w.add_tensor(p + "ffn_down.weight", normal((n_embd, n_ff), 2.0 * branch / np.sqrt(n_ff)))

    if family == "gemma3":
        # tied output: logits = (norm(x) * output_norm) . token_embd, token_embd at 1/sqrt(n_embd)
        w.add_tensor("output_norm.weight", norm_weight(n_embd, 3.0))
    else:
        w.add_tensor("output_norm.weight", norm_weight(n_embd))
        w.add_tensor("output.weight", normal((n_vocab, n_embd), 3.0 / np.sqrt(n_embd)))

    write_and_close(w)
    return FamilySpec(
        path, n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab, n_ctx_train, rope_base, rms_eps, seed,
        family=family,
        architecture=arch,
        rope_type=ROPE_TYPE[family],
        rope_factors=rope_factors,
        n_swa=n_swa if family == "gemma3" else 0,
        swa_layers=swa_layers,
        rope_base_swa=float(rope_base_swa) if family == "gemma3" else None,
    )
