"""Synthetic layer inputs with SmolLM2-like shapes and structure, for tests and benchmarks.

Not a model: just enough structure for the policies to have something to find. Values
are clustered (many near-duplicate directions) in shallow layers and diffuse in deep
ones; pre-RoPE keys share a common direction; keys get a real (adjacent-pair) RoPE at
their positions; window queries attend sharply in deep layers (a few "hot" keys plus
token 0 as a sink) and broadly in shallow ones.
"""

from __future__ import annotations

import numpy as np

from .inputs import Geometry, LayerInput
from .rope import rotate

SMOLLM2 = Geometry(n_layer=30, n_head=9, n_head_kv=3, head_dim_k=64, head_dim_v=64)


def apply_rope(x: np.ndarray, positions: np.ndarray, base: float = 10000.0) -> np.ndarray:
    """Adjacent-pair (llama NORM) RoPE of ``x`` [n, H, d] at ``positions``, float32.

    Exact float64 angles (:func:`.rope.rope_angles` with ``float32_steps=False``): the
    inputs need a real rotation, not ggml's, and plans recorded on them stay valid.
    """
    return rotate(x, positions, base=base, float32_steps=False)


def make_layer(
    geometry: Geometry,
    layer: int,
    n: int,
    w: int = 32,
    r: int | None = None,
    seed: int = 0,
    start: int = 0,
) -> LayerInput:
    """One synthetic layer: ``n`` old tokens at ``start..start+n-1``, then ``r >= w`` recent ones."""
    rng = np.random.default_rng(seed * 1000 + layer)
    hkv, hq, dk, dv = geometry.n_head_kv, geometry.n_head, geometry.head_dim_k, geometry.head_dim_v
    r = w if r is None else max(r, w)
    depth = layer / max(geometry.n_layer - 1, 1)  # 0 shallow .. 1 deep
    total = n + r
    pos = np.arange(start, start + total, dtype=np.int32)

    # values: shallow layers draw from few prototypes with small noise
    n_proto = max(4, int(total * (0.05 + 0.9 * depth)))
    protos = rng.standard_normal((hkv, n_proto, dv)).astype(np.float32)
    lab = rng.integers(0, n_proto, size=(total, hkv))
    noise = 0.08 + 0.6 * depth
    v = protos[np.arange(hkv)[None, :], lab]
    v = v + noise * rng.standard_normal((total, hkv, dv)).astype(np.float32)
    v *= rng.uniform(0.5, 1.5, size=(total, hkv, 1)).astype(np.float32)

    common = rng.standard_normal((1, hkv, dk)).astype(np.float32) * 1.5
    k_pre = common + rng.standard_normal((total, hkv, dk)).astype(np.float32)
    k_post = apply_rope(k_pre, pos)

    # window queries: aim at a few hot keys (deep) or many (shallow), plus the sink
    q_pos = pos[-w:]
    n_hot = max(2, int(n * (0.3 - 0.28 * depth)))
    q = rng.standard_normal((w, hq, dk)).astype(np.float32) * 0.5
    sharp = 1.0 + 3.0 * depth
    for j in range(hq):
        h = j // geometry.g
        hot = rng.choice(n, size=min(n_hot, n), replace=False) if n else np.zeros(0, int)
        if len(hot):
            pick = hot[rng.integers(0, len(hot), size=w)]
            q[:, j, :] += sharp * k_post[pick, h, :] / np.sqrt(dk) * 2.0
        q[:, j, :] += sharp * k_post[0, h, :] / np.sqrt(dk)
    return LayerInput(
        layer=layer,
        k=k_post[:n],
        k_pre=k_pre[:n],
        v=v[:n],
        positions=pos[:n],
        q_window=q,
        q_positions=q_pos,
        k_recent=k_post[n:],
        recent_positions=pos[n:],
        v_recent=v[n:],
    )


def make_layers(
    geometry: Geometry = SMOLLM2, n: int = 512, w: int = 32, r: int | None = None, seed: int = 0
) -> list[LayerInput]:
    """All layers of a synthetic context."""
    return [make_layer(geometry, layer, n, w, r, seed) for layer in range(geometry.n_layer)]
