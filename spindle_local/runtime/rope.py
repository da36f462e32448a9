"""RoPE in numpy, matching ggml's angles, to undo and redo the rotation of cached keys.

The KV cache holds keys after RoPE; the codebook works on keys before it. Undoing the
rotation needs exactly the parameters llama.cpp used. We support the plain variants
(NORM: adjacent pairs ``(2i, 2i+1)``; NEOX: halves ``(i, i + n_rot/2)``) with linear
frequency scaling and per-frequency factors (``rope_freqs``); anything else (YaRN extrapolation, M-RoPE) reports ``None`` from
:func:`rope_supported` and the engine keeps such models' keys out of the codebook.
Angles are built in float32 by repeated multiplication, as ggml builds them, so the
round trip reproduces the cached keys to f16 precision even at large positions.
"""

from __future__ import annotations

import numpy as np

ROPE_TYPE_NORM = 0
ROPE_TYPE_NEOX = 2


def rope_supported(rope_type: int, ext_factor: float) -> bool:
    return rope_type in (ROPE_TYPE_NORM, ROPE_TYPE_NEOX) and abs(ext_factor) < 1e-12


def rope_angles(positions: np.ndarray, base: float, n_rot: int, freq_scale: float = 1.0,
                factors: np.ndarray | None = None) -> np.ndarray:
    """Angles ``[n, n_rot/2]`` (float64 from float32 steps, like ggml's rope kernel); ``factors``
    (``[n_rot/2]``, a model's ``rope_freqs`` tensor, Llama 3.1 style) divide each frequency."""
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


def _pairs(n_rot: int, rope_type: int) -> tuple[np.ndarray, np.ndarray]:
    if rope_type == ROPE_TYPE_NEOX:
        a = np.arange(n_rot // 2)
        return a, a + n_rot // 2
    a = np.arange(0, n_rot, 2)
    return a, a + 1


def rotate(x: np.ndarray, positions: np.ndarray, *, base: float, n_rot: int, rope_type: int = ROPE_TYPE_NORM,
           freq_scale: float = 1.0, factors: np.ndarray | None = None, inverse: bool = False) -> np.ndarray:
    """Apply (or with ``inverse`` undo) RoPE to ``x[n, heads, d]`` at ``positions[n]``; float32 result."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 3 or x.shape[0] != len(positions):
        raise ValueError(f"expected x [n, heads, d] with n = {len(positions)}, got {x.shape}")
    theta = rope_angles(positions, base, n_rot, freq_scale, factors)
    cos = np.cos(theta)[:, None, :]
    sin = np.sin(theta)[:, None, :] * (-1.0 if inverse else 1.0)
    ia, ib = _pairs(n_rot, rope_type)
    a = x[:, :, ia].astype(np.float64)
    b = x[:, :, ib].astype(np.float64)
    out = x.copy()
    out[:, :, ia] = a * cos - b * sin
    out[:, :, ib] = a * sin + b * cos
    return out
