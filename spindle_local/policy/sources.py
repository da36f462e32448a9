"""Where a plan's layers come from: one layer at a time, never the whole model at once.

A plan needs every layer's keys and values twice: once to score its tokens (the scores
decide how the bytes are shared between layers), once to build the layer's store from
the tokens it keeps. Holding every layer's f32 K/V between the two costs several times
the KV cache it compresses; a :class:`LayerSource` instead hands out one layer's
:class:`LayerInput` on request, and the policy drops it as soon as its small results
(scores, a :class:`LayerMeta`) are taken. The engine's source reads llama.cpp each time;
:class:`ListSource` serves inputs already in memory (tests, benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from .inputs import LayerInput


class LayerSource(Protocol):
    """Layers of one plan, in layer order; ``load(i)`` may be called more than once per layer."""

    def __len__(self) -> int: ...

    def load(self, i: int) -> LayerInput:
        """The ``i``-th layer's input (fresh arrays the caller may drop)."""
        ...


class ListSource:
    """A :class:`LayerSource` over inputs already in memory."""

    def __init__(self, layers: Sequence[LayerInput]) -> None:
        self.layers = list(layers)

    def __len__(self) -> int:
        return len(self.layers)

    def load(self, i: int) -> LayerInput:
        return self.layers[i]


@dataclass(frozen=True)
class LayerMeta:
    """What cross-layer decisions read from a layer: its tokens, not their vectors.

    Same field names as :class:`LayerInput`, so the budget, copy-span and salience
    helpers accept either. A layer scored where its KV lives (no vectors on the host)
    also keeps its gather ``source``: eviction plans such a layer from its meta and
    scores alone, without loading (and scoring) it a second time.
    """

    layer: int
    n: int
    positions: np.ndarray
    available: np.ndarray | None
    salient: np.ndarray | None
    source: np.ndarray | None = None  # [n, n_head_kv] of a scored layer, None when it has vectors
    sentence: np.ndarray | None = None  # [n] token marks (salience.scan_pieces: OPENS, ENDS, STOPS, ...), None: unknown
    count: np.ndarray | None = None  # [n, n_head_kv] tokens each pair stands for (policy/mass.py), None: 1

    # a meta never holds vectors (what :func:`~.layer_plans.head_store` checks)
    k = None
    v = None
    k_pre = None

    @classmethod
    def of(cls, inp: LayerInput) -> LayerMeta:
        source = np.asarray(inp.source) if inp.k is None and inp.source is not None else None
        return cls(inp.layer, inp.n, np.asarray(inp.positions), inp.available_mask(), inp.salient, source,
                   inp.sentence, inp.count)

    @property
    def scored(self) -> bool:
        """Planned from scores alone: its store is gathered from ``source``."""
        return self.source is not None

    def available_mask(self) -> np.ndarray | None:
        return self.available
