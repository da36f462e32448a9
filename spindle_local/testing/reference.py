"""Plain-numpy reference forward for llama-architecture GGUF models (f32/f16 weights).

Used as an oracle for the patched llama.cpp: besides the ordinary causal forward it
can attend over an externally supplied per-layer prefix K/V (for instance the
contents of the compressed store) with a per-query-head visibility mask, which is
exactly the attention the patch builds over ``store ∪ regular cache``.

Semantics follow llama.cpp's ``LLM_ARCH_LLAMA`` graph:

* ``x = token_embd[tokens]``; per layer
  ``h = x + Wo · attn(rope(Wq·n), rope(Wk·n), Wv·n)`` with ``n = rmsnorm(x) * attn_norm``,
  ``x = h + Wdown · (silu(Wgate·m) * Wup·m)`` with ``m = rmsnorm(h) * ffn_norm``;
  ``logits = Woutput · (rmsnorm(x) * output_norm)``.
* RMSNorm ``x / sqrt(mean(x²) + eps)``, eps from
  ``llama.attention.layer_norm_rms_epsilon``.
* Attention scale ``1/sqrt(head_dim)``; GQA query head ``h`` uses KV head
  ``h // (n_head / n_head_kv)`` (llama.cpp's broadcast order).
* RoPE of type NORM (``LLAMA_ROPE_TYPE_NORM``): adjacent pairs ``(2i, 2i+1)`` rotated
  by ``theta_i = pos · base^(-2i/n_rot)``; no YaRN / linear scaling.
* The cache stores K and V as f16, so by default (``kv_f16=True``) K (after RoPE)
  and V are rounded to f16 before attention, as llama.cpp does.

Everything is computed in float64 (inputs are f32 weights), which is far more precise
than llama.cpp; differences to llama.cpp are its rounding, not ours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from spindle_local.policy.rope import rotate

__all__ = [
    "LayerWeights",
    "PrefixKV",
    "ReferenceModel",
    "ReferenceOutput",
    "rope",
    "unrope",
]


# --------------------------------------------------------------------------- RoPE


def rope(x: np.ndarray, positions: np.ndarray | Sequence[int], base: float, n_rot: int | None = None) -> np.ndarray:
    """RoPE NORM of ``x[n, heads, d]`` at ``positions[n]`` in float64 (:func:`~spindle_local.policy.rope.rotate`).

    Pairs ``(2i, 2i+1)`` for ``2i < n_rot`` (default: all of ``d``) are rotated by ggml's
    angles ``pos · base^(-2i/n_rot)``; dims ``>= n_rot`` pass through.
    """
    return rotate(x, positions, base=base, n_rot=n_rot, dtype=np.float64)


def unrope(x: np.ndarray, positions: np.ndarray | Sequence[int], base: float, n_rot: int | None = None) -> np.ndarray:
    """Inverse of :func:`rope`: rotate back by the same angles (exact up to float64)."""
    return rotate(x, positions, base=base, n_rot=n_rot, dtype=np.float64, inverse=True)


# --------------------------------------------------------------------------- data


@dataclass
class PrefixKV:
    """Externally given keys/values one layer attends to before the new tokens.

    ``k[S, Hkv, d]`` post-RoPE, ``v[S, Hkv, dv]``, ``visible[H, S]`` bool: query
    head ``h`` may attend to slot ``s`` iff ``visible[h, s]``. All slots count as
    older than every new token (no causal masking against them).
    """

    k: np.ndarray
    v: np.ndarray
    visible: np.ndarray

    @staticmethod
    def all_visible(k: np.ndarray, v: np.ndarray, n_head: int) -> "PrefixKV":
        """A prefix every query head sees completely."""
        return PrefixKV(k=k, v=v, visible=np.ones((n_head, k.shape[0]), dtype=bool))


@dataclass
class LayerWeights:
    """One transformer block's weights as ``[out, in]`` float64 matrices."""

    attn_norm: np.ndarray
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    ffn_norm: np.ndarray
    w_gate: np.ndarray
    w_up: np.ndarray
    w_down: np.ndarray


@dataclass
class ReferenceOutput:
    """Result of :meth:`ReferenceModel.forward` for ``n`` new tokens.

    Per-layer lists (index = layer):
    ``q[n, H, d]`` post-RoPE; ``k[n, Hkv, d]`` post-RoPE and ``v[n, Hkv, dv]`` exactly
    as used in attention (f16-rounded when ``kv_f16``); ``k_pre[n, Hkv, d]`` before
    RoPE (not rounded); ``attn[H, n, S+n]`` softmax weights over ``prefix ∪ new``
    (only when ``return_attn``).
    """

    logits: np.ndarray
    positions: np.ndarray
    q: list[np.ndarray] = field(default_factory=list)
    k: list[np.ndarray] = field(default_factory=list)
    k_pre: list[np.ndarray] = field(default_factory=list)
    v: list[np.ndarray] = field(default_factory=list)
    attn: list[np.ndarray] = field(default_factory=list)

    def prefix(self, n_head: int) -> list[PrefixKV]:
        """This output's K/V as an all-visible prefix for a following forward."""
        return [PrefixKV.all_visible(k, v, n_head) for k, v in zip(self.k, self.v)]


# --------------------------------------------------------------------------- model


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float64)


def _flash_vec_attention(q: np.ndarray, kh: np.ndarray, vh: np.ndarray, allowed: np.ndarray,
                         scale: float) -> np.ndarray:
    """Replay ggml-cpu's ``flash_attn_ext_f16_one_chunk`` for an f16 K/V cache.

    Per (head, query): Q rounded to f16, scores ``f32(q·k)·scale``, keys visited in
    order, masked keys skipped, online softmax in f32 (``M``, ``S``) and the value
    accumulator kept in f16 (rounded after every scale and multiply-add), finally
    divided by ``S`` in f32. ``q[n, H, d]``, ``kh[T, H, d]``, ``vh[T, H, dv]``
    (already repeated per query head), ``allowed[H, n, T]``. Returns ``[n, H, dv]``.
    """
    f32, f16 = np.float32, np.float16
    s_all = (np.einsum("ihd,jhd->hij", _f16(q), kh).astype(f32) * f32(scale))  # [H, n, T]
    H, n, T = s_all.shape
    dv = vh.shape[2]
    M = np.full((H, n), -np.inf, dtype=f32)
    S = np.zeros((H, n), dtype=f32)
    acc = np.zeros((H, n, dv), dtype=f16)
    v16 = vh.astype(f16).astype(f32)  # [T, H, dv]
    with np.errstate(over="ignore", invalid="ignore"):
        for j in range(T):
            ok = allowed[:, :, j]
            if not ok.any():
                continue
            s = s_all[:, :, j]
            new_max = s > M
            ms = np.where(new_max, np.exp(M - s), f32(1.0)).astype(f32)
            vs = np.where(new_max, f32(1.0), np.exp(s - M)).astype(f32)
            ms = np.where(ok, ms, f32(1.0))
            vs = np.where(ok, vs, f32(0.0))
            M = np.where(ok & new_max, s, M)
            scaled = (acc.astype(f32) * ms[..., None]).astype(f16)
            upd = (scaled.astype(f32) + v16[j][:, None, :] * vs[..., None]).astype(f16)
            acc = np.where(ok[..., None], upd, acc)
            S = np.where(ok, S * ms + vs, S).astype(f32)
    inv = np.where(S == 0, f32(0.0), f32(1.0) / np.where(S == 0, f32(1.0), S)).astype(f32)
    out = acc.astype(f32) * inv[..., None]
    return out.astype(np.float64).transpose(1, 0, 2)


@dataclass
class ReferenceModel:
    """Weights and hyper-parameters of a llama GGUF, with a numpy forward."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_v: int
    n_rot: int
    n_ff: int
    n_vocab: int
    rope_base: float
    rms_eps: float
    token_embd: np.ndarray
    layers: list[LayerWeights]
    output_norm: np.ndarray
    output: np.ndarray

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ReferenceModel":
        """Read a llama-architecture GGUF with f32/f16 tensors via ``gguf.GGUFReader``.

        GGUF stores ggml ``ne`` (innermost first); the reader's numpy arrays already
        have the reversed shape, so a matrix with ``ne = {in, out}`` arrives as
        ``[out, in]`` and ``y = W @ x`` is the ggml ``mul_mat``.
        """
        import gguf

        r = gguf.GGUFReader(str(Path(path)))

        def meta(key: str, default: object = None) -> object:
            f = r.get_field(key)
            if f is None:
                if default is None:
                    raise KeyError(f"GGUF key {key!r} missing")
                return default
            return f.contents()

        arch = meta("general.architecture")
        if arch != "llama":
            raise ValueError(f"reference forward supports architecture 'llama', not {arch!r}")
        tensors: dict[str, np.ndarray] = {}
        for t in r.tensors:
            if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                raise ValueError(f"tensor {t.name}: type {t.tensor_type.name} unsupported (f32/f16 only)")
            shape = tuple(int(s) for s in reversed(t.shape))
            tensors[t.name] = np.asarray(t.data, dtype=np.float64).reshape(shape)

        n_embd = int(meta("llama.embedding_length"))
        n_head = int(meta("llama.attention.head_count"))
        n_head_kv = int(meta("llama.attention.head_count_kv", n_head))
        head_dim = int(meta("llama.attention.key_length", n_embd // n_head))
        head_dim_v = int(meta("llama.attention.value_length", head_dim))
        n_layer = int(meta("llama.block_count"))
        layers = []
        for il in range(n_layer):
            p = f"blk.{il}."
            layers.append(
                LayerWeights(
                    attn_norm=tensors[p + "attn_norm.weight"],
                    wq=tensors[p + "attn_q.weight"],
                    wk=tensors[p + "attn_k.weight"],
                    wv=tensors[p + "attn_v.weight"],
                    wo=tensors[p + "attn_output.weight"],
                    ffn_norm=tensors[p + "ffn_norm.weight"],
                    w_gate=tensors[p + "ffn_gate.weight"],
                    w_up=tensors[p + "ffn_up.weight"],
                    w_down=tensors[p + "ffn_down.weight"],
                )
            )
        token_embd = tensors["token_embd.weight"]
        output = tensors.get("output.weight", token_embd)  # tied when absent, as llama.cpp
        return cls(
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            head_dim_v=head_dim_v,
            n_rot=int(meta("llama.rope.dimension_count", head_dim)),
            n_ff=int(meta("llama.feed_forward_length")),
            n_vocab=int(token_embd.shape[0]),
            rope_base=float(meta("llama.rope.freq_base", 10000.0)),
            rms_eps=float(meta("llama.attention.layer_norm_rms_epsilon")),
            token_embd=token_embd,
            layers=layers,
            output_norm=tensors["output_norm.weight"],
            output=output,
        )

    @property
    def n_gqa(self) -> int:
        """Query heads per KV head."""
        return self.n_head // self.n_head_kv

    def forward(
        self,
        tokens: Sequence[int] | np.ndarray,
        positions: Sequence[int] | np.ndarray | None = None,
        prefix: Sequence[PrefixKV] | None = None,
        *,
        kv_f16: bool = True,
        q_f16: bool = False,
        p_f16: bool = False,
        flash_vec: bool = False,
        return_attn: bool = False,
    ) -> ReferenceOutput:
        """Run ``tokens`` (ids) through the model and return logits for every token.

        ``positions`` default to ``S, S+1, ...`` where ``S`` is the prefix length of
        layer 0 (0 without a prefix) -- only right for an uncompressed prefix; pass
        the true positions when slots were dropped. New tokens attend causally to each other by
        index (token ``i`` sees new tokens ``j <= i``) and to the prefix slots their
        query head sees. ``prefix`` K/V are used as given (rounded to f16 when
        ``kv_f16``, which is a no-op for values that came from f16).

        Rounding flags (to mimic llama.cpp's CPU kernels; see tests for measured
        effects): ``kv_f16`` rounds K (post-RoPE) and V to f16 like the f16 cache
        (closer to llama.cpp in every mode). Without flash attention llama.cpp's
        ``mul_mat`` also converts Q and the softmax weights to f16 (its ``vec_dot``
        type for an f16 cache): ``q_f16=True, p_f16=True`` mimic that path. With
        flash attention (llama.cpp's default on CPU) leave both False: batches of
        32 or more query tokens run ggml's tiled f32 kernel (64 or more in a stock
        build; the patch tiles 32-63 rows too). Smaller batches (decode!) run ggml's
        vector kernel, which rounds Q to f16 and
        accumulates ``softmax · V`` online in an f16 buffer: ``flash_vec=True``
        replays that kernel key by key (slower; ``attn`` still reports exact
        weights).
        """
        tok = np.asarray(tokens, dtype=np.int64).reshape(-1)
        n = tok.shape[0]
        if n == 0:
            raise ValueError("no tokens")
        if tok.min() < 0 or tok.max() >= self.n_vocab:
            raise ValueError(f"token ids must be in [0, {self.n_vocab})")
        if prefix is not None and len(prefix) != self.n_layer:
            raise ValueError(f"prefix has {len(prefix)} layers, model has {self.n_layer}")
        if positions is None:
            s0 = 0 if prefix is None else int(prefix[0].k.shape[0])
            pos = np.arange(s0, s0 + n, dtype=np.int64)
        else:
            pos = np.asarray(positions, dtype=np.int64).reshape(-1)
            if pos.shape[0] != n:
                raise ValueError(f"{pos.shape[0]} positions for {n} tokens")

        H, Hkv, d, dv = self.n_head, self.n_head_kv, self.head_dim, self.head_dim_v
        rnd = _f16 if kv_f16 else (lambda a: a)
        out = ReferenceOutput(logits=np.empty(0), positions=pos)
        causal = np.tril(np.ones((n, n), dtype=bool))  # [query, key]
        x = self.token_embd[tok]
        for il, lw in enumerate(self.layers):
            h = _rms_norm(x, lw.attn_norm, self.rms_eps)
            q = rope((h @ lw.wq.T).reshape(n, H, d), pos, self.rope_base, self.n_rot)
            k_pre = (h @ lw.wk.T).reshape(n, Hkv, d)
            k = rnd(rope(k_pre, pos, self.rope_base, self.n_rot))
            v = rnd((h @ lw.wv.T).reshape(n, Hkv, dv))

            if prefix is not None:
                p = prefix[il]
                pk = rnd(np.asarray(p.k, dtype=np.float64))
                pv = rnd(np.asarray(p.v, dtype=np.float64))
                vis = np.asarray(p.visible, dtype=bool)
                S = pk.shape[0]
                if pk.shape != (S, Hkv, d) or pv.shape != (S, Hkv, dv) or vis.shape != (H, S):
                    raise ValueError(
                        f"layer {il} prefix shapes k{pk.shape} v{pv.shape} visible{vis.shape}, "
                        f"expected k({S},{Hkv},{d}) v({S},{Hkv},{dv}) visible({H},{S})"
                    )
                k_all = np.concatenate([pk, k], axis=0)
                v_all = np.concatenate([pv, v], axis=0)
                # allowed[h, i, j]: head h, new token i, key j over prefix ∪ new.
                allowed = np.concatenate(
                    [np.broadcast_to(vis[:, None, :], (H, n, S)), np.broadcast_to(causal, (H, n, n))],
                    axis=2,
                )
            else:
                k_all, v_all = k, v
                allowed = np.broadcast_to(causal, (H, n, n))

            # Query head h reads KV head h // n_gqa.
            kh = np.repeat(k_all, self.n_gqa, axis=1)  # [T, H, d]
            vh = np.repeat(v_all, self.n_gqa, axis=1)  # [T, H, dv]
            scores = np.einsum("ihd,jhd->hij", _f16(q) if q_f16 else q, kh) / np.sqrt(d)
            scores = np.where(allowed, scores, -np.inf)
            m = scores.max(axis=2, keepdims=True)
            # A query row with nothing visible would be NaN; llama.cpp yields zeros there.
            m = np.where(np.isfinite(m), m, 0.0)
            w = np.exp(scores - m)
            den = w.sum(axis=2, keepdims=True)
            w = np.divide(w, den, out=np.zeros_like(w), where=den > 0)
            if flash_vec:
                att = _flash_vec_attention(q, kh, vh, allowed, 1.0 / np.sqrt(d)).reshape(n, H * dv)
            else:
                att = np.einsum("hij,jhd->ihd", _f16(w) if p_f16 else w, vh).reshape(n, H * dv)
            x = x + att @ lw.wo.T

            hf = _rms_norm(x, lw.ffn_norm, self.rms_eps)
            x = x + (_silu(hf @ lw.w_gate.T) * (hf @ lw.w_up.T)) @ lw.w_down.T

            out.q.append(q)
            out.k.append(k)
            out.k_pre.append(k_pre)
            out.v.append(v)
            if return_attn:
                out.attn.append(w)

        out.logits = _rms_norm(x, self.output_norm, self.rms_eps) @ self.output.T
        return out
