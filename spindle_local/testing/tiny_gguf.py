"""Tiny random-weight llama-architecture GGUF models for structural tests.

The files are written with the ``gguf`` package and load in stock (and patched)
llama.cpp, so every tensor shape the KV-cache patch meets (MHA, GQA, several head
sizes, ``n_embd != n_head * head_dim``) can be exercised in seconds without real
weights. All weights are f32 so that llama.cpp's matrix products are exact f32
dot products (no activation quantisation), which lets the numpy reference in
:mod:`spindle_local.testing.reference` match llama.cpp's logits closely.

Weight scales are chosen so that

* the residual stream stays O(1) over a few layers,
* attention scores ``q.k / sqrt(d)`` have a standard deviation of a few units
  (``qk_scale``), i.e. attention is peaky: masking a handful of tokens visibly
  changes the logits, which is what mask tests need,
* logits have a spread of a few units.

Callers feed token ids directly; the vocabulary is a minimal SentencePiece-style
("llama") vocab: ``<unk>``, ``<s>``, ``</s>``, byte tokens ``<0x00>``..., then
filler tokens. No BOS is assumed anywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["TinySpec", "write_tiny_llama"]

#: RMSNorm epsilon written to ``llama.attention.layer_norm_rms_epsilon``.
DEFAULT_RMS_EPS = 1e-5


@dataclass(frozen=True)
class TinySpec:
    """Hyper-parameters of a tiny model written by :func:`write_tiny_llama`."""

    path: Path
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    rope_base: float
    rms_eps: float
    seed: int

    @property
    def n_gqa(self) -> int:
        """Query heads per KV head."""
        return self.n_head // self.n_head_kv


def _vocab(n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """Minimal SPM vocab llama.cpp accepts: unk/bos/eos, byte tokens, fillers."""
    from gguf import TokenType

    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    types: list[int] = [int(TokenType.UNKNOWN), int(TokenType.CONTROL), int(TokenType.CONTROL)]
    for b in range(256):
        if len(tokens) >= n_vocab:
            break
        tokens.append(f"<0x{b:02X}>".encode())
        types.append(int(TokenType.BYTE))
    i = 0
    while len(tokens) < n_vocab:
        tokens.append(f"tok{i}".encode())
        types.append(int(TokenType.NORMAL))
        i += 1
    scores = [0.0 if t != int(TokenType.NORMAL) else -float(k) for k, t in enumerate(types)]
    return tokens, scores, types


def write_tiny_llama(
    path: str | os.PathLike[str],
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int = 16,
    n_ff: int = 128,
    n_vocab: int = 256,
    n_ctx_train: int = 4096,
    rope_base: float = 10000.0,
    seed: int = 0,
    rms_eps: float = DEFAULT_RMS_EPS,
    qk_scale: float = 4.0,
) -> TinySpec:
    """Write a random-weight llama GGUF (f32 weights) to ``path`` and return its spec.

    ``qk_scale`` is the target standard deviation of the attention scores
    ``q.k / sqrt(head_dim)`` for unit-RMS inputs; larger means peakier attention.
    ``n_embd`` need not equal ``n_head * head_dim`` (key/value lengths are written
    explicitly). K and V head sizes are equal and all dims are rotated
    (llama.cpp's llama graph requires ``n_rot == head_dim``).
    """
    import gguf

    if n_head % n_head_kv:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_head_kv ({n_head_kv})")
    if head_dim % 2:
        raise ValueError("head_dim must be even (RoPE rotates pairs)")
    if n_vocab < 4:
        raise ValueError("n_vocab must be >= 4")

    path = Path(path)
    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight(n: int) -> np.ndarray:
        # Near 1, not exactly 1, so a wrong norm-weight application is caught.
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    q_dim = n_head * head_dim
    kv_dim = n_head_kv * head_dim
    # Score std for unit-RMS x: s_q * s_k * n_embd  ->  choose s_q = s_k.
    s_qk = float(np.sqrt(qk_scale / n_embd))
    # Residual branches: keep each branch's contribution around 0.5 RMS per layer.
    branch = 0.5

    w = gguf.GGUFWriter(str(path), "llama")
    add_hparams(w, "spindle-tiny-llama", n_ctx_train=n_ctx_train, n_embd=n_embd, n_layer=n_layer, n_ff=n_ff,
                n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, rope_base=rope_base, rms_eps=rms_eps,
                n_vocab=n_vocab)

    add_vocab(w, *_vocab(n_vocab))

    # numpy shape = reversed ggml ne: a [out, in] array is a ggml {in, out} matrix.
    w.add_tensor("token_embd.weight", normal((n_vocab, n_embd), 1.0))
    for il in range(n_layer):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", norm_weight(n_embd))
        w.add_tensor(p + "attn_q.weight", normal((q_dim, n_embd), s_qk))
        w.add_tensor(p + "attn_k.weight", normal((kv_dim, n_embd), s_qk))
        w.add_tensor(p + "attn_v.weight", normal((kv_dim, n_embd), 1.0 / np.sqrt(n_embd)))
        w.add_tensor(p + "attn_output.weight", normal((n_embd, q_dim), branch / np.sqrt(q_dim)))
        w.add_tensor(p + "ffn_norm.weight", norm_weight(n_embd))
        w.add_tensor(p + "ffn_gate.weight", normal((n_ff, n_embd), 1.0 / np.sqrt(n_embd)))
        w.add_tensor(p + "ffn_up.weight", normal((n_ff, n_embd), 1.0 / np.sqrt(n_embd)))
        # silu(g)*u has RMS ~0.5 for unit g, u; scale down accordingly.
        w.add_tensor(p + "ffn_down.weight", normal((n_embd, n_ff), 2.0 * branch / np.sqrt(n_ff)))
    w.add_tensor("output_norm.weight", norm_weight(n_embd))
    w.add_tensor("output.weight", normal((n_vocab, n_embd), 3.0 / np.sqrt(n_embd)))

    write_and_close(w)
    return TinySpec(path, n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab, n_ctx_train,
                    float(rope_base), float(rms_eps), seed)


def add_hparams(w, name: str, *, n_ctx_train: int, n_embd: int, n_layer: int, n_ff: int, n_head: int,
                n_head_kv: int, head_dim: int, rope_base: float, rms_eps: float, n_vocab: int,
                head_size: bool = True) -> None:
    """The hyper-parameters every tiny model's header carries (f32 tensors); ``head_size``
    False for families that derive it from ``n_embd / n_head``."""
    import gguf

    w.add_name(name)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    if head_size:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(rms_eps)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)


def add_vocab(w, tokens: list[bytes], scores: list[float], types: list[int]) -> None:
    """Write a SentencePiece-style vocabulary (unk 0, bos 1, eos 2; no BOS or EOS added)."""
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def write_and_close(w) -> None:
    """Write a ``gguf.GGUFWriter``'s header, metadata and tensors, and close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
