"""What a policy is given: model geometry and one layer's captured K/V/Q.

Shapes: ``n`` old tokens (the ones to compress, possibly including tokens already in
the store, given as their reconstructed vectors when the engine re-plans), ``w`` window
queries (the most recent tokens), ``r`` recent keys that stay uncompressed in the
regular cache (they include the window tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """Attention shape of the model: ``g = n_head // n_head_kv`` query heads share a KV head."""

    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int

    def __post_init__(self) -> None:
        if self.n_head_kv <= 0 or self.n_head % self.n_head_kv != 0:
            raise ValueError(
                f"n_head ({self.n_head}) must be a positive multiple of n_head_kv ({self.n_head_kv})"
            )

    @property
    def g(self) -> int:
        """Query heads per KV head (GQA group size; 1 for plain MHA)."""
        return self.n_head // self.n_head_kv


@dataclass
class LayerInput:
    """One layer's captured tensors (all float32 except positions).

    ``k``: [n, Hkv, dk] post-RoPE keys of the old tokens; ``k_pre``: the same before RoPE
    (None when the runtime cannot undo RoPE exactly; the codebook then leaves K raw);
    ``v``: [n, Hkv, dv]; ``positions``: int32 [n]; ``q_window``: [w, H, dk] post-RoPE
    queries of the most recent ``w`` tokens at ``q_positions``; ``k_recent``: [r, Hkv, dk]
    post-RoPE keys of the uncompressed recent tokens at ``recent_positions`` (when those
    positions are None they are taken to be the ``r`` positions ending at the last window
    query). ``v_recent`` is optional and only used by the ``auto`` role choice, which
    measures attention-output errors; without it that measurement ignores the recent
    tokens' values (their attention weights still enter the softmax normaliser).
    ``available``: bool [n, Hkv], None meaning all True. When re-planning, KV heads of
    the store hold different tokens; a (token, KV head) pair that head no longer holds
    is False (its vectors are placeholders): it gets no attention in the scores and is
    never selected for that head.

    A *scored* input carries no vectors (``k``, ``k_pre``, ``v`` None): the runtime has
    computed, where the KV lives, the window attention ``attn`` float32 [H, n] (already
    averaged over the window queries that see each token, before pooling) and the value
    norms ``v_norm`` float32 [n, Hkv]; ``source`` int32 [n, Hkv] names where each (token,
    KV head) pair lives, and the plan's stores then list sources instead of rows
    (:attr:`~.plan.HeadStore.source`). Such a layer can be evicted, not made a codebook.
    """

    layer: int
    k: np.ndarray | None
    k_pre: np.ndarray | None
    v: np.ndarray | None
    positions: np.ndarray
    q_window: np.ndarray
    q_positions: np.ndarray
    k_recent: np.ndarray | None = None
    recent_positions: np.ndarray | None = None
    v_recent: np.ndarray | None = None
    available: np.ndarray | None = None
    salient: np.ndarray | None = None  # [n] salient tokens, bool or run priority (policy/salience.py); None: unknown
    sentence: np.ndarray | None = None  # [n] uint8 token marks (salience.scan_pieces: OPENS, ENDS, STOPS, ...); None: unknown
    attn: np.ndarray | None = None  # scored inputs: [H, n] window attention per query head
    v_norm: np.ndarray | None = None  # scored inputs: [n, Hkv] value norms
    source: np.ndarray | None = None  # scored inputs: [n, Hkv] where each pair lives (runtime's numbering)
    count: np.ndarray | None = None  # [n, Hkv] tokens each pair stands for in attention (policy/mass.py); None: 1

    @property
    def n(self) -> int:
        return int(np.asarray(self.positions).shape[0])

    @property
    def scored(self) -> bool:
        """True when the input carries scores and sources instead of vectors."""
        return self.k is None

    def available_mask(self) -> np.ndarray | None:
        """``available`` as bool [n, Hkv], or None when every pair is available."""
        if self.available is None:
            return None
        a = np.asarray(self.available, dtype=bool)
        return None if a.all() else a

    def resolved_recent_positions(self) -> np.ndarray | None:
        """Positions of ``k_recent`` (inferred as contiguous up to the last query when not given)."""
        if self.k_recent is None:
            return None
        if self.recent_positions is not None:
            return np.asarray(self.recent_positions, dtype=np.int32)
        r = int(self.k_recent.shape[0])
        last = int(np.max(self.q_positions)) if len(self.q_positions) else 0
        return np.arange(last - r + 1, last + 1, dtype=np.int32)

    def validate(self, geometry: Geometry) -> None:
        """Raise ValueError with a precise message when shapes do not match ``geometry``."""
        hkv, h, dk, dv = geometry.n_head_kv, geometry.n_head, geometry.head_dim_k, geometry.head_dim_v
        n = self.n

        def check(name: str, arr: np.ndarray | None, shape: tuple) -> None:
            if arr is None:
                return
            if arr.ndim != len(shape) or any(s is not None and a != s for a, s in zip(arr.shape, shape)):
                raise ValueError(f"layer {self.layer}: {name} has shape {arr.shape}, expected {shape}")

        check("k", self.k, (n, hkv, dk))
        check("k_pre", self.k_pre, (n, hkv, dk))
        check("v", self.v, (n, hkv, dv))
        check("positions", self.positions, (n,))
        check("q_window", self.q_window, (None, h, dk))
        check("q_positions", self.q_positions, (self.q_window.shape[0],))
        check("available", self.available, (n, hkv))
        check("salient", self.salient, (n,))
        check("sentence", self.sentence, (n,))
        check("attn", self.attn, (h, n))
        check("v_norm", self.v_norm, (n, hkv))
        check("source", self.source, (n, hkv))
        check("count", self.count, (n, hkv))
        if self.k is None and (self.attn is None or self.v is not None or self.source is None):
            raise ValueError(f"layer {self.layer}: an input without keys needs attn and source, and no values")
        check("k_recent", self.k_recent, (None, hkv, dk))
        if self.k_recent is not None:
            r = self.k_recent.shape[0]
            check("recent_positions", self.recent_positions, (r,))
            check("v_recent", self.v_recent, (r, hkv, dv))
