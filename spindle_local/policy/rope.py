"""Recover each token's RoPE rotation from its pre- and post-RoPE key (for error estimates only).

The ``auto`` role choice compares attention outputs, which needs codebook keys back in
post-RoPE space. Rather than re-implementing every RoPE variant, the rotation is read off
the data: RoPE turns dimension pairs by an angle that depends only on position and pair,
so for every token and pair ``(a, b)``: ``cos = (a a' + b b') / r^2``,
``sin = (a b' - b a') / r^2``, taken from the KV head where that pair is largest (all
heads share the angle). Both pairings llama.cpp uses are tried: adjacent ``(2i, 2i+1)``
(NORM) and split halves ``(i, i + d/2)`` (NEOX). Pairs that the model leaves unrotated
(partial rotary dims) come out as the identity. If neither pairing preserves pair norms
the function returns None and the caller must not trust K codebook errors.
The runtime re-applies RoPE with llama.cpp's own op; this module never feeds the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RopeMap:
    """Per-token rotation of each dimension pair: apply with :meth:`rotate`."""

    idx_a: np.ndarray  # int [P]
    idx_b: np.ndarray  # int [P]
    cos: np.ndarray  # float32 [n, P]
    sin: np.ndarray  # float32 [n, P]

    def rotate(self, x: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Rotate pre-RoPE vectors ``x`` [s, d] (tokens ``rows`` of the map) to post-RoPE."""
        c = self.cos if rows is None else self.cos[rows]
        s = self.sin if rows is None else self.sin[rows]
        out = x.copy()
        a = x[:, self.idx_a]
        b = x[:, self.idx_b]
        out[:, self.idx_a] = a * c - b * s
        out[:, self.idx_b] = a * s + b * c
        return out


def _pairs(d: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    if mode == "adjacent":
        return np.arange(0, d, 2), np.arange(1, d, 2)
    return np.arange(d // 2), np.arange(d // 2, d)


def infer_rope(k_pre: np.ndarray, k_post: np.ndarray, tol: float = 2e-2) -> RopeMap | None:
    """The rotation taking ``k_pre`` [n, Hkv, d] to ``k_post``, or None if it is not pairwise."""
    n, hkv, d = k_pre.shape
    if d % 2 or n == 0:
        return None
    pre = k_pre.astype(np.float64)
    post = k_post.astype(np.float64)
    scale = np.sqrt((pre**2).sum(axis=2)).max() + 1e-30
    for mode in ("adjacent", "neox"):
        ia, ib = _pairs(d, mode)
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
