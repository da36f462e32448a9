"""RoPE: the one implementation of the rotation, its angles and its pair layouts.

The KV cache holds keys after RoPE; the codebook works on keys before it. Undoing and
redoing the rotation on the host (:func:`rotate`) needs exactly the parameters llama.cpp
used. We support the plain variants (NORM: adjacent pairs ``(2i, 2i+1)``; NEOX: halves
``(i, i + n_rot/2)``) with linear frequency scaling (``freq_scale``) and per-frequency
factors (``rope_freqs``, Llama 3.1 style); anything else (YaRN extrapolation, M-RoPE)
fails :func:`rope_supported` and the engine keeps such models' keys out of the codebook.
Angles are built in float32 by repeated multiplication, as ggml builds them, so the
round trip reproduces the cached keys to f16 precision even at large positions.

:func:`infer_rope` instead reads a rotation off the data, for error estimates of the
``auto`` role choice (:mod:`.roles`): RoPE turns dimension pairs by an angle that depends
only on position and pair, so for every token and pair ``(a, b)``:
``cos = (a a' + b b') / r^2``, ``sin = (a b' - b a') / r^2``, taken from the KV head where
that pair is largest (all heads share the angle). Both pair layouts are tried. Pairs that
the model leaves unrotated (partial rotary dims) come out as the identity. If neither
layout preserves pair norms it returns None and the caller must not trust K codebook
errors. The runtime re-applies RoPE in the graph with llama.cpp's own op.

This module is plain numpy: the runtime (``runtime/engine.py``), the synthetic inputs
and the numpy reference forward (``testing/reference.py``) all rotate through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

ROPE_TYPE_NORM = 0
ROPE_TYPE_NEOX = 2


def rope_supported(rope_type: int, ext_factor: float) -> bool:
    """Whether :func:`rotate` reproduces this RoPE variant (NORM or NEOX, no YaRN extrapolation)."""
    return rope_type in (ROPE_TYPE_NORM, ROPE_TYPE_NEOX) and abs(ext_factor) < 1e-12


def rope_angles(positions: np.ndarray | Sequence[int], base: float, n_rot: int, freq_scale: float = 1.0,
                factors: np.ndarray | None = None, *, float32_steps: bool = True) -> np.ndarray:
    """Angles ``[n, n_rot/2]`` as float64.

    ggml builds them as ``theta = pos * freq_scale; theta *= base^(-2/n_rot)`` per pair, in
    float32 (the default here): at large positions this differs from the exact
    ``pos * base^(-2i/n_rot)`` by ~1e-4 rad, above the f16 precision of cached keys.
    ``float32_steps=False`` gives those exact float64 angles instead: the synthetic inputs
    (:mod:`.synthetic`) use them, and plans recorded on those inputs depend on every bit.
    ``factors`` (``[n_rot/2]``, a model's ``rope_freqs`` tensor) divide each frequency.
    """
    if not float32_steps:
        pos64 = np.asarray(positions, dtype=np.float64).reshape(-1) * float(freq_scale)
        theta64 = pos64[:, None] * (base ** (-np.arange(0, n_rot, 2) / n_rot))[None, :]
        return theta64 if factors is None else theta64 / np.asarray(factors, dtype=np.float64)[: n_rot // 2]
    pos = np.asarray(positions, dtype=np.float32).reshape(-1) * np.float32(freq_scale)
    theta_scale = np.float32(np.power(np.float32(base), np.float32(-2.0) / np.float32(n_rot)))
    theta = np.empty((pos.shape[0], n_rot // 2), dtype=np.float32)
    cur = pos.astype(np.float32)
    for i in range(n_rot // 2):
        theta[:, i] = cur
        cur = (cur * theta_scale).astype(np.float32)
    if factors is not None:
        theta = (theta / np.asarray(factors, dtype=np.float32)[: n_rot // 2]).astype(np.float32)
    return theta.astype(np.float64)


def pair_layout(n_rot: int, rope_type: int = ROPE_TYPE_NORM) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(a, b)`` of the dimension pairs RoPE turns together, pair ``i`` by angle ``i``."""
    if rope_type == ROPE_TYPE_NEOX:
        a = np.arange(n_rot // 2)
        return a, a + n_rot // 2
    a = np.arange(0, n_rot, 2)
    return a, a + 1


def _turn(out: np.ndarray, a: np.ndarray, b: np.ndarray, ia: np.ndarray, ib: np.ndarray,
          cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Write the pairs ``(a, b)`` turned by ``(cos, sin)`` into ``out[..., ia]``, ``out[..., ib]``."""
    out[..., ia] = a * cos - b * sin
    out[..., ib] = a * sin + b * cos
    return out


def rotate(x: np.ndarray, positions: np.ndarray | Sequence[int], *, base: float, n_rot: int | None = None,
           rope_type: int = ROPE_TYPE_NORM, freq_scale: float = 1.0, factors: np.ndarray | None = None,
           inverse: bool = False, dtype: type = np.float32, float32_steps: bool = True) -> np.ndarray:
    """Apply (or with ``inverse`` undo) RoPE to ``x[n, heads, d]`` at ``positions[n]``.

    Pairs within the first ``n_rot`` dims (default: all of ``d``) turn; the rest pass
    through. The turn is computed in float64 and stored as ``dtype``: float32 for the
    runtime (compared exactly against llama.cpp's cached keys), float64 for the reference
    forward. ``float32_steps``: see :func:`rope_angles`.
    """
    x = np.asarray(x, dtype=dtype)
    pos = np.asarray(positions).reshape(-1)
    if x.ndim != 3 or x.shape[0] != pos.shape[0]:
        raise ValueError(f"expected x [n, heads, d] with n = {pos.shape[0]}, got {x.shape}")
    n_rot = x.shape[2] if n_rot is None else int(n_rot)
    if n_rot % 2 or n_rot > x.shape[2]:
        raise ValueError(f"n_rot={n_rot} must be even and <= head dim {x.shape[2]}")
    theta = rope_angles(pos, base, n_rot, freq_scale, factors, float32_steps=float32_steps)
    cos = np.cos(theta)[:, None, :]
    sin = np.sin(theta)[:, None, :] * (-1.0 if inverse else 1.0)
    ia, ib = pair_layout(n_rot, rope_type)
    return _turn(x.copy(), x[..., ia].astype(np.float64), x[..., ib].astype(np.float64), ia, ib, cos, sin)


@dataclass
class RopeMap:
    """Per-token rotation of each dimension pair (read off data by :func:`infer_rope`)."""

    idx_a: np.ndarray  # int [P]
    idx_b: np.ndarray  # int [P]
    cos: np.ndarray  # float32 [n, P]
    sin: np.ndarray  # float32 [n, P]

    def rotate(self, x: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Rotate pre-RoPE vectors ``x`` [s, d] (tokens ``rows`` of the map) to post-RoPE."""
        c = self.cos if rows is None else self.cos[rows]
        s = self.sin if rows is None else self.sin[rows]
        return _turn(x.copy(), x[:, self.idx_a], x[:, self.idx_b], self.idx_a, self.idx_b, c, s)


def infer_rope(k_pre: np.ndarray, k_post: np.ndarray, tol: float = 2e-2) -> RopeMap | None:
    """The rotation taking ``k_pre`` [n, Hkv, d] to ``k_post``, or None if it is not pairwise."""
    n, hkv, d = k_pre.shape
    if d % 2 or n == 0:
        return None
    pre = k_pre.astype(np.float64)
    post = k_post.astype(np.float64)
    scale = np.sqrt((pre**2).sum(axis=2)).max() + 1e-30
    for rope_type in (ROPE_TYPE_NORM, ROPE_TYPE_NEOX):
        ia, ib = pair_layout(d, rope_type)
        r_pre = pre[:, :, ia] ** 2 + pre[:, :, ib] ** 2
        r_post = post[:, :, ia] ** 2 + post[:, :, ib] ** 2
        if np.max(np.abs(np.sqrt(r_pre) - np.sqrt(r_post))) > tol * scale:
            continue
        best = np.argmax(r_pre, axis=1)  # [n, P]: KV head with the largest pair
        take = lambda arr: np.take_along_axis(arr, best[:, None, :], axis=1)[:, 0, :]  # noqa: E731
        a, b = take(pre[:, :, ia]), take(pre[:, :, ib])
        a2, b2 = take(post[:, :, ia]), take(post[:, :, ib])
        r2 = a * a + b * b
        ok = r2 > 1e-20
        cos = np.where(ok, (a * a2 + b * b2) / np.where(ok, r2, 1.0), 1.0)
        sin = np.where(ok, (a * b2 - b * a2) / np.where(ok, r2, 1.0), 0.0)
        norm = np.sqrt(cos * cos + sin * sin)
        norm = np.where(norm > 0, norm, 1.0)
        return RopeMap(ia, ib, (cos / norm).astype(np.float32), (sin / norm).astype(np.float32))
    return None
