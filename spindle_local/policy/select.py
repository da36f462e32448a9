"""Token selection per KV head from window scores.

* :func:`union_select` (SpindleKV): every query head of the group ranks the tokens by its
  own scores; the heads take tokens round-robin (each its next best) until the union holds
  ``S`` tokens. Query head ``j``'s mask marks its own top-``k_j``, ``k_j`` the largest
  ``k`` whose top-``k`` lies inside the union (at least the ``k`` or ``k+1`` tokens it took
  in the round-robin; more when its next choices were stored for other heads anyway, which
  costs nothing); a token two heads want is stored once.
  Round-robin is the same as "largest common ``k`` whose union fits" but also spends the
  slots that a strict common ``k`` would leave empty. Numba ``_union_select_nb`` with the
  reference :func:`union_select_ref`.
* :func:`group_select` (SnapKV/PyramidKV): scores averaged over the group, one top-``S``,
  every query head sees every kept slot.

Protected tokens (sinks) must arrive with score ``+inf``: with a stable ranking they
come first for every head, so no tie can evict them.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _union_select_nb(scores: np.ndarray, n_slots: int) -> tuple[np.ndarray, np.ndarray]:
    g, n = scores.shape
    if n_slots >= n:
        return np.arange(n), np.ones((g, n), dtype=np.bool_)
    order = np.empty((g, n), dtype=np.int64)
    for j in range(g):
        order[j] = np.argsort(-scores[j], kind="mergesort")
    in_union = np.zeros(n, dtype=np.bool_)
    seen = np.zeros((g, n), dtype=np.bool_)
    taken = np.zeros(g, dtype=np.int64)  # how far down its ranking each head went
    cnt = 0
    t = 0
    while cnt < n_slots:
        for j in range(g):
            a = order[j, t]
            seen[j, a] = True
            taken[j] = t + 1
            if not in_union[a]:
                in_union[a] = True
                cnt += 1
                if cnt == n_slots:
                    break
        t += 1
    # each head extends its own top-k while its next token is already stored (free)
    for j in range(g):
        t = taken[j]
        while t < n and in_union[order[j, t]]:
            seen[j, order[j, t]] = True
            t += 1
    sel = np.nonzero(in_union)[0]
    mask = np.empty((g, sel.shape[0]), dtype=np.bool_)
    for j in range(g):
        for s in range(sel.shape[0]):
            mask[j, s] = seen[j, sel[s]]
    return sel, mask


def union_select_ref(scores: np.ndarray, n_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Numpy reference of ``_union_select_nb``: (token indices ascending, mask [g, S])."""
    g, n = scores.shape
    if n_slots >= n:
        return np.arange(n), np.ones((g, n), dtype=bool)
    order = np.argsort(-scores, axis=1, kind="stable")
    chosen: list[int] = []
    in_union = set()
    seen = [set() for _ in range(g)]
    t = 0
    while len(chosen) < n_slots:
        for j in range(g):
            a = int(order[j, t])
            seen[j].add(a)
            if a not in in_union:
                in_union.add(a)
                chosen.append(a)
                if len(chosen) == n_slots:
                    break
        t += 1
    for j in range(g):  # largest k_j whose top-k_j is inside the union
        for a in order[j]:
            if int(a) not in in_union:
                break
            seen[j].add(int(a))
    sel = np.array(sorted(chosen), dtype=np.int64)
    mask = np.array([[a in seen[j] for a in sel] for j in range(g)], dtype=bool).reshape(g, len(sel))
    return sel, mask


def union_select(scores: np.ndarray, n_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query-head top-k with a shared union of ``n_slots`` tokens (see module doc)."""
    return _union_select_nb(np.ascontiguousarray(scores, dtype=np.float32), int(n_slots))


def union_priority(scores: np.ndarray) -> np.ndarray:
    """All tokens in the round-robin order of :func:`union_select` (its first S are its choice).

    The codebook layers use this order to trim a codebook built on a larger set.
    """
    g, n = scores.shape
    order = np.argsort(-scores, axis=1, kind="stable")
    # round-robin order = sort by (rank in the best head, that head's index)
    rank = np.empty_like(order)
    rows = np.arange(g)[:, None]
    rank[rows, order] = np.arange(n)[None, :]
    best_rank = rank.min(axis=0)
    best_head = rank.argmin(axis=0)
    return np.lexsort((best_head, best_rank)).astype(np.int64)


def group_aggregate(scores: np.ndarray, how: str = "mean") -> np.ndarray:
    """Scores [g, n] of a GQA group reduced to one per token: ``'mean'`` or ``'max'`` over the heads.

    ``'max'`` keeps a token when any query head of the group wants it; a top-``S`` of the
    max is the same as taking (query head, token) pairs in descending score order until
    ``S`` distinct tokens are held, so a head with concentrated attention claims few
    slots and a head with broad attention many (AdaKV's flattened top-k, within a group).
    """
    x = scores.astype(np.float64)
    if how == "mean":
        return x.mean(axis=0)
    if how == "max":
        return x.max(axis=0)
    raise ValueError(f"unknown group aggregation {how!r}")


def group_priority(scores: np.ndarray, how: str = "mean") -> np.ndarray:
    """All tokens in descending order of the group's aggregated score (stable)."""
    return np.argsort(-group_aggregate(scores, how), kind="stable").astype(np.int64)


def group_select(scores: np.ndarray, n_slots: int, how: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Top ``n_slots`` of the group-aggregated scores (default: averaged, as SnapKV);
    every query head sees every slot."""
    g, n = scores.shape
    if n_slots >= n:
        return np.arange(n), np.ones((g, n), dtype=bool)
    top = group_priority(scores, how)[:n_slots]
    return np.sort(top), np.ones((g, n_slots), dtype=bool)
