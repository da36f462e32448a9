"""Token selection per KV head from window scores.

* :func:`union_select` (SpindleKV): every query head of the group ranks the tokens by its
  own scores; the heads take tokens round-robin (each its next best) until the union holds
  ``S`` tokens. Query head ``j``'s mask marks its own top-``k_j``, ``k_j`` the largest
  ``k`` whose top-``k`` lies inside the union (at least the ``k`` or ``k+1`` tokens it took
  in the round-robin; more when its next choices were stored for other heads anyway, which
  costs nothing); a token two heads want is stored once.
  Round-robin is the same as "largest common ``k`` whose union fits" but also spends the
  slots that a strict common ``k`` would leave empty. Vectorised numpy (scores are
  ``n_head x tokens`` floats, small enough that no compiled kernel is needed), with the
  loop reference :func:`union_select_ref`.
* :func:`group_select` (SnapKV/PyramidKV): scores averaged over the group, one top-``S``,
  every query head sees every kept slot.

Protected tokens (sinks) must arrive with score ``+inf``: with a stable ranking they
come first for every head, so no tie can evict them.
"""

from __future__ import annotations

import numpy as np


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


def _round_robin(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(order [g, n], rank of each token in its best head, that head, round-robin order [n]).

    The round robin visits (rank 0, head 0), (0, 1), ..., (1, 0), ...; a token enters at its
    first visit, the lexicographically smallest (rank, head) among its heads.
    """
    g, n = scores.shape
    order = np.argsort(-scores, axis=1, kind="stable")
    rank = np.empty_like(order)
    rank[np.arange(g)[:, None], order] = np.arange(n)[None, :]
    best_rank = rank.min(axis=0)
    best_head = rank.argmin(axis=0)  # the first head with that rank
    return order, best_rank, best_head, np.argsort(best_rank * g + best_head, kind="stable").astype(np.int64)


def union_select(scores: np.ndarray, n_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query-head top-k with a shared union of ``n_slots`` tokens (see module doc).

    Vectorised form of :func:`union_select_ref`: the union is the first ``n_slots`` tokens
    of the round-robin order; the visit that adds the last of them, (rank ``t``, head
    ``j``), fixes how far each head went (``t + 1`` for heads up to ``j``, ``t`` after
    it), and each head then extends its own top-k over tokens already in the union.
    """
    scores = np.asarray(scores, dtype=np.float32)
    g, n = scores.shape
    if n_slots >= n:
        return np.arange(n), np.ones((g, n), dtype=bool)
    if n_slots <= 0:
        return np.zeros(0, np.int64), np.zeros((g, 0), dtype=bool)
    order, best_rank, best_head, prio = _round_robin(scores)
    chosen = prio[:n_slots]
    t, j_last = int(best_rank[chosen[-1]]), int(best_head[chosen[-1]])
    in_union = np.zeros(n, dtype=bool)
    in_union[chosen] = True
    seen = np.zeros((g, n), dtype=bool)
    for j in range(g):
        k = t + 1 if j <= j_last else t
        tail = in_union[order[j, k:]]
        k += tail.size if tail.all() else int(np.argmin(tail))
        seen[j, order[j, :k]] = True
    sel = np.nonzero(in_union)[0].astype(np.int64)
    return sel, seen[:, sel]


def union_priority(scores: np.ndarray) -> np.ndarray:
    """All tokens in the round-robin order of :func:`union_select` (its first S are its choice).

    The codebook layers use this order to trim a codebook built on a larger set.
    """
    return _round_robin(np.asarray(scores))[3]


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
