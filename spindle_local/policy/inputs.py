"""What a policy is given: model geometry, one layer's captured K/V/Q, and its knobs.

Shapes: ``n`` old tokens (the ones to compress, possibly including tokens already in
the store, given as their reconstructed vectors when the engine re-plans), ``w`` window
queries (the most recent tokens), ``r`` recent keys that stay uncompressed in the
regular cache (they include the window tokens).
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Pooling = Literal["max", "avg"]


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
    attn: np.ndarray | None = None  # scored inputs: [H, n] window attention per query head
    v_norm: np.ndarray | None = None  # scored inputs: [n, Hkv] value norms
    source: np.ndarray | None = None  # scored inputs: [n, Hkv] where each pair lives (runtime's numbering)

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
        check("attn", self.attn, (h, n))
        check("v_norm", self.v_norm, (n, hkv))
        check("source", self.source, (n, hkv))
        if self.k is None and (self.attn is None or self.v is not None or self.source is None):
            raise ValueError(f"layer {self.layer}: an input without keys needs attn and source, and no values")
        check("k_recent", self.k_recent, (None, hkv, dk))
        if self.k_recent is not None:
            r = self.k_recent.shape[0]
            check("recent_positions", self.recent_positions, (r,))
            check("v_recent", self.v_recent, (r, hkv, dv))


# The SpindleKV paper's choices for the spindle-only knobs (the defaults are the measured best).
PAPER_SPINDLE = dict(query_masks="own", gqa_select="union", layer_alloc="pyramid", value_weight=False,
                     salient_share=0.0)


@dataclass
class PolicyConfig:
    """Knobs shared by all policies (each policy reads the ones it needs).

    Defaults follow DESIGN.md: window 32, 4 sinks, max-pooling with kernel 7 (PyramidKV
    runners), a pyramid whose deepest layer gets 1/20 of the mean budget (``beta = 20``),
    ``theta_K = 0.98`` / ``theta_V = 0.95``. ``codebook_layers='auto'`` chooses per layer
    from the context itself; on SmolLM2-135M the codebook wins only in layer 0, so auto
    examines only the first ``auto_max_layers`` layers (None: a tenth of the stack,
    rounded up: 3 of SmolLM2's 30 layers), which bounds its cost.

    Other fields: ``window`` is what the engine should capture (the policy uses the
    queries it is given); ``codebook_block`` sizes the codebook's edge buffer
    (``n * block`` pairs, see :mod:`.codebook`); ``auto_margin`` is the relative error
    advantage the codebook needs in ``auto``; ``include_recent_in_softmax`` normalises
    window attention over the recent keys too; ``threads`` bounds planning threads;
    ``extra['attn_scale']`` overrides the ``1/sqrt(dk)`` softmax scale.

    ``spindle`` only (measured on SmolLM2-135M with pydoc text, see
    ``scripts/tune_policy.py``; :data:`PAPER_SPINDLE` gives the paper's choices):
    ``query_masks`` ``'union'`` lets every query head of a group see every stored slot
    (``'own'``, the paper: each sees only its own top-k; same bytes, more missing
    attention mass); ``gqa_select`` ``'mean'`` (default) keeps the tokens whose mean score
    over the group's query heads is highest, ``'max'`` those whose best score is (a
    flattened top-k over (query head, token) pairs: heads with broad attention claim more
    slots than sharp ones; same KLD at 4,000 tokens, lower top-1 agreement and it lost a
    repeated digit of a pass key, "9542" for 95541, that mean keeps); ``layer_alloc``
    ``'flat'`` gives every layer the same share, ``'mass'`` (default) gives each eviction
    layer ``alloc_floor`` of the flat share, and at least ``alloc_min_slots`` slots up to
    that share, and hands the rest of the slots to the largest window attention masses
    over all layers (layers with concentrated attention need few slots), ``'pyramid'``
    follows ``pyramid_beta``;
    ``value_weight`` multiplies attention by the token's value norm relative to its KV
    head's mean (a token with a small value adds little to the output); ``anchor_*``
    keep copy spans (the run after a token a deep head attends to strongly, see
    :mod:`.anchors`).
    """

    window: int = 32
    sinks: int = 4
    pooling: Pooling | None = "max"
    pool_kernel: int = 7
    theta_k: float = 0.98
    theta_v: float = 0.95
    codebook_layers: int | str = "auto"
    pyramid_beta: float = 20.0
    codebook_block: int = 256
    auto_max_layers: int | None = None
    auto_margin: float = 0.0
    include_recent_in_softmax: bool = True
    # spindle only (snapkv/pyramidkv ignore these; PAPER_SPINDLE restores the paper's choices)
    query_masks: str = "union"  # "union" (every query head sees the stored union) or "own" (paper)
    gqa_select: str = "mean"  # tokens of a GQA group: "mean" over its query heads, "max", "union" (round-robin, paper)
    layer_alloc: str = "mass"  # "flat", "mass" (window score mass above a floor) or "pyramid" (paper)
    alloc_floor: float = 0.5  # "mass": share of the flat per-layer budget every eviction layer keeps
    alloc_min_slots: int = 256  # "mass": ... and at least this many slots (at most its flat share)
    value_weight: bool = True  # scores times the token's relative value norm
    anchor_span: int = 24  # copy spans (policy/anchors.py): tokens kept after each anchor; 0 = off
    anchor_share: float = 0.25  # copy spans take at most this share of a layer's mean slot count
    anchor_tokens: int | None = None  # ... and at most this many tokens (None: no absolute cap)
    anchor_from: int | None = None  # first layer with copy spans (None: half the stack)
    anchor_min_share: float = 0.1  # an anchor holds at least this share of some deep head's window attention
    salient_share: float = 0.25  # salient runs (policy/salience.py) take at most this share of the smallest layer's slots; 0 = off
    salient_before: int = 8  # ... each with this many tokens before it (what introduces a number or name)
    salient_after: int = 2  # ... and this many after it
    threads: int | None = None  # planning threads (None: the CPUs this process may use)
    extra: dict = field(default_factory=dict)

    def codebook_candidates(self, n_layer: int) -> int:
        """How many leading layers may become codebook layers (the only ones that read ``k_pre``)."""
        if isinstance(self.codebook_layers, int):
            return min(int(self.codebook_layers), n_layer)
        if self.auto_max_layers is not None:
            return min(int(self.auto_max_layers), n_layer)
        return min(max(1, math.ceil(n_layer / 10)), n_layer)

    def __post_init__(self) -> None:
        if self.sinks < 0:
            raise ValueError("sinks must be >= 0")
        if self.pooling not in (None, "max", "avg"):
            raise ValueError(f"pooling must be 'max', 'avg' or None, not {self.pooling!r}")
        if self.pool_kernel < 1:
            raise ValueError("pool_kernel must be >= 1")
        for name in ("theta_k", "theta_v"):
            t = getattr(self, name)
            if not (0.0 < t <= 1.0):
                raise ValueError(f"{name} must be in (0, 1], got {t}")
        if isinstance(self.codebook_layers, str) and self.codebook_layers.strip().isdigit():
            self.codebook_layers = int(self.codebook_layers)  # "3" from a command line
        if isinstance(self.codebook_layers, str):
            if self.codebook_layers != "auto":
                raise ValueError(f"codebook_layers must be an int or 'auto', not {self.codebook_layers!r}")
        elif int(self.codebook_layers) < 0:
            raise ValueError("codebook_layers must be >= 0")
        if self.pyramid_beta < 1.0:
            raise ValueError("pyramid_beta must be >= 1 (1 = flat)")
        if self.query_masks not in ("own", "union"):
            raise ValueError(f"query_masks must be 'own' or 'union', not {self.query_masks!r}")
        if self.gqa_select not in ("union", "max", "mean"):
            raise ValueError(f"gqa_select must be 'union', 'max' or 'mean', not {self.gqa_select!r}")
        if self.layer_alloc not in ("flat", "pyramid", "mass"):
            raise ValueError(f"layer_alloc must be 'flat', 'pyramid' or 'mass', not {self.layer_alloc!r}")
        if not (0.0 <= self.alloc_floor <= 1.0) or self.alloc_min_slots < 0:
            raise ValueError("alloc_floor must be in [0, 1] and alloc_min_slots >= 0")
        if self.anchor_span < 0 or not (0.0 <= self.anchor_share <= 1.0) or self.anchor_min_share < 0:
            raise ValueError("anchor_span must be >= 0, anchor_share in [0, 1], anchor_min_share >= 0")
        if self.anchor_tokens is not None and self.anchor_tokens < 0:
            raise ValueError("anchor_tokens must be >= 0 or None")
        if not (0.0 <= self.salient_share <= 1.0) or self.salient_before < 0 or self.salient_after < 0:
            raise ValueError("salient_share must be in [0, 1], salient_before and salient_after >= 0")
        if self.codebook_block < 1:
            raise ValueError("codebook_block must be >= 1")
