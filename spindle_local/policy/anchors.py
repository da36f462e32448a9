"""Copy spans: keep the run of tokens that follows what the question points at.

Window scores say which tokens the prompt's last queries attend to, not what generation
will need next. Asked for a pass key, the question's queries attend to the start of the
key (the token after "The pass key is"); the following digits score low, because the
query that will look for them is the one generated after the first digit. Pooling
spreads a score over three neighbours, so the first digits survive and the rest is
evicted: the model answers "64." instead of "64597." (traced on SmolLM2-135M, a 6,000-
token prompt, budget 0.25: keeping the needle's 24 tokens in every KV head of layers
15-29 alone turns that answer right).

So a few *anchors* are chosen across the whole stack: the tokens that take the largest
share of some deep query head's window attention (a retrieval head's target stands out
there however long the prompt), read before pooling (max-pooling copies a target's
score onto its neighbours, and a span starting at a copy starts late). In every layer
from ``anchor_from`` on, each anchor and the ``anchor_span`` tokens after it are
protected in every KV head, strongest anchor first; a run that no longer fits is
skipped (the strongest anchor is often a token just before the recent part, whose run
is short, and stopping at the first misfit lost the needle behind it). The protected set
is capped at ``anchor_share`` of the layer's mean slot count (and at ``anchor_tokens``
when set), so at most that share of the budget moves from score order to copy spans.
Only sharp targets are anchors: a token must hold at least ``anchor_min_share`` (a
tenth) of some deep head's window attention. With 1 % the cap filled up with runs after
ordinary tokens once misfits were skipped, and a 6,000-token key was lost at 0.25.

Kernels: :func:`layer_strength` and :func:`anchor_strength` (numpy; per position, the best
share over query heads, then over layers) and :func:`span_positions` /
:func:`span_positions_ref` (index intervals / sets: anchors → protected positions under
the cap).
"""

from __future__ import annotations

import numpy as np

from .inputs import LayerInput
from .salience import greedy_intervals


def head_shares(scores: np.ndarray, positions: np.ndarray, sinks: int) -> np.ndarray:
    """Scores [H, n] as each query head's share of its window attention (sinks and non-finite: 0)."""
    s = np.where(np.isfinite(scores), scores, 0.0).astype(np.float64)
    s[:, np.asarray(positions) < sinks] = 0.0
    tot = s.sum(axis=1, keepdims=True)
    return s / np.where(tot > 0, tot, 1.0)


def layer_strength(scores: np.ndarray, positions: np.ndarray, sinks: int) -> np.ndarray:
    """Per token of one layer, the largest share of window attention any of its query heads
    gives it (scores [H, n] before pooling): all that anchors need of a layer's scores."""
    return head_shares(scores, positions, sinks).max(axis=0)


def anchor_strength(layers: list[LayerInput], strengths: list[np.ndarray],
                    first_layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions ascending, strength): per position, the largest :func:`layer_strength`
    of a layer >= ``first_layer``."""
    deep = [(inp, st) for inp, st in zip(layers, strengths) if inp.layer >= first_layer and inp.n]
    if not deep:
        return np.zeros(0, np.int64), np.zeros(0)
    union = np.unique(np.concatenate([np.asarray(inp.positions, np.int64) for inp, _ in deep]))
    best = np.zeros(len(union))
    for inp, st in deep:
        rows = np.searchsorted(union, np.asarray(inp.positions, np.int64))
        np.maximum.at(best, rows, st)
    return union, best


def span_positions_ref(positions: np.ndarray, order: np.ndarray, span: int, cap: int) -> np.ndarray:
    """Reference of :func:`span_positions`: anchors in ``order`` (indices into the
    ascending ``positions``), each with every position up to ``span`` after it, taken
    whole while the union stays within ``cap`` (a run that would pass it is skipped);
    returns the protected positions."""
    taken: set[int] = set()
    for a in order:
        run = {int(p) for p in positions[(positions >= positions[a]) & (positions <= positions[a] + span)]}
        if len(taken | run) > cap:
            continue
        taken |= run
    return np.array(sorted(taken), dtype=positions.dtype)


def span_positions(positions: np.ndarray, order: np.ndarray, span: int, cap: int) -> np.ndarray:
    """Protected positions for anchors ``order`` (see :func:`span_positions_ref`): with
    ascending positions each anchor's run is the index interval up to ``positions[a] + span``."""
    pos = np.asarray(positions, np.int64)
    order = np.asarray(order, np.int64)
    hi = np.searchsorted(pos, pos[order] + span, side="right")
    return pos[greedy_intervals(len(pos), order, hi, cap)]


def copy_spans(layers: list[LayerInput], strengths: list[np.ndarray], *, first_layer: int, span: int,
               cap: int, min_share: float) -> np.ndarray:
    """Positions to protect in the layers from ``first_layer`` on (ascending, at most ``cap``).

    Anchors are positions whose strength (:func:`anchor_strength` of the layers'
    :func:`layer_strength`) is at least ``min_share``, strongest first.
    """
    if cap <= 0 or span < 0:
        return np.zeros(0, np.int64)
    pos, strength = anchor_strength(layers, strengths, first_layer)
    order = np.argsort(-strength, kind="stable")
    order = order[strength[order] >= min_share]
    if len(order) == 0:
        return np.zeros(0, np.int64)
    return span_positions(pos, order, span, cap)


def boost(scores: np.ndarray, positions: np.ndarray, protected: np.ndarray) -> np.ndarray:
    """Scores [H, n] with ``protected`` positions ranked above every other finite score.

    Sinks (+inf) stay first and unavailable pairs (-inf) stay out; a protected token keeps
    its own order among the protected (its score plus twice the head's largest finite score).
    """
    hit = np.isin(np.asarray(positions), protected)
    if not hit.any():
        return scores
    out = np.array(scores, copy=True)
    fin = np.isfinite(out)
    top = np.where(fin, np.abs(out), 0.0).max(axis=1, keepdims=True)
    sub = out[:, hit]
    out[:, hit] = np.where(np.isfinite(sub), sub + 2.0 * top + 1e-6, sub)
    return out
