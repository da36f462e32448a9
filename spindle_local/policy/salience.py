"""Salient runs: keep the numbers and names of a text, with the words that introduce them.

A document read before its question is compressed with nothing but its own last queries
to score by, and those ask how the text goes on, not what a later question will look
for. The facts a later question asks about are mostly *specific*: numbers, codes, dates,
names — tokens the model cannot reconstruct from context, unlike the prose around
them. So, independently of any window, every run of salient tokens (a token with a
digit, or a capitalised word that does not start a sentence) is protected together
with the ``before`` tokens that introduce it ("The pass key is", "Alice's number:") and
the ``after`` tokens that close it, in every eviction layer. The protected set is capped
at ``share`` of the layer's slots. When a text has more salient runs than that, the runs
that carry the most information go first: a run's priority is the self-information of
its tokens within the text, ``sum(-log(count(token) / n))``, divided by how often the
same run recurs (:func:`run_priority`). A five-digit code stated once outranks a name
the text repeats on every page, which a later question could find in any of its copies.
Ties go to the runs the window attends to most, then the newest.

Classification needs token text, which the policy does not have: the engine passes
:func:`salient_tokens` of the token pieces (a plain-Python function, kept here with the
rule it implements). Kernels: :func:`run_positions` (numba) / :func:`run_positions_ref`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_SENTENCE_END = (".", "!", "?", ":", "\n", '"', "'", ">", "*", "#", "-")


def salient_tokens(pieces: list[str]) -> np.ndarray:
    """bool [n]: which tokens of ``pieces`` (in text order) are salient.

    A piece is salient when it has a digit, or when it begins a capitalised word that
    does not follow a sentence end (sentence-initial capitals are not names).
    """
    out = np.zeros(len(pieces), dtype=bool)
    prev_end = True  # the start of a text is a sentence start
    for i, piece in enumerate(pieces):
        if any(c.isdigit() for c in piece):
            out[i] = True
        else:
            word = piece.lstrip()
            starts_word = bool(word) and (piece[:1].isspace() or prev_end or i == 0)
            if starts_word and word[:1].isupper() and not prev_end:
                out[i] = True
        stripped = piece.rstrip(" \t")
        if stripped:
            prev_end = stripped.endswith(_SENTENCE_END) or piece.endswith("\n")
        elif "\n" in piece:
            prev_end = True
    return out


@njit(cache=True, nogil=True)
def _run_positions_nb(positions: np.ndarray, salient: np.ndarray, order: np.ndarray, starts: np.ndarray,
                      ends: np.ndarray, before: int, after: int, cap: int) -> np.ndarray:
    n = positions.shape[0]
    taken = np.zeros(n, dtype=np.bool_)
    count = 0
    for t in range(order.shape[0]):
        r = order[t]
        lo = positions[starts[r]] - before
        hi = positions[ends[r]] + after
        need = 0
        for j in range(n):
            if positions[j] >= lo and positions[j] <= hi and not taken[j]:
                need += 1
        if count + need > cap:
            continue
        for j in range(n):
            if positions[j] >= lo and positions[j] <= hi:
                taken[j] = True
        count += need
    return positions[taken]


def salient_runs(salient: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) indices, inclusive, of the maximal runs of True (non-zero) in ``salient``."""
    s = np.asarray(salient) > 0
    if not s.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    d = np.diff(np.concatenate([[0], s.astype(np.int8), [0]]))
    return np.nonzero(d == 1)[0].astype(np.int64), (np.nonzero(d == -1)[0] - 1).astype(np.int64)


def run_positions_ref(positions: np.ndarray, salient: np.ndarray, order: np.ndarray, before: int,
                      after: int, cap: int) -> np.ndarray:
    """Numpy reference of :func:`run_positions`: runs in ``order`` (indices into
    :func:`salient_runs`), each widened by ``before``/``after`` positions, taken whole while
    the union stays within ``cap`` (a run that would pass it is skipped)."""
    starts, ends = salient_runs(salient)
    taken: set[int] = set()
    for r in order:
        lo, hi = positions[starts[r]] - before, positions[ends[r]] + after
        run = {int(p) for p in positions[(positions >= lo) & (positions <= hi)]}
        if len(taken | run) > cap:
            continue
        taken |= run
    return np.array(sorted(taken), dtype=np.int64)


def run_positions(positions: np.ndarray, salient: np.ndarray, order: np.ndarray, before: int,
                  after: int, cap: int) -> np.ndarray:
    """Protected positions (ascending) for the salient runs in ``order``; see the reference."""
    starts, ends = salient_runs(salient)
    return _run_positions_nb(np.ascontiguousarray(positions, np.int64), np.asarray(salient) > 0,
                             np.ascontiguousarray(order, np.int64), starts, ends, int(before), int(after),
                             int(cap))


def run_priority(ids: np.ndarray, salient: np.ndarray) -> np.ndarray:
    """float [n]: each salient token's run priority (module docstring); 0 where not salient."""
    ids = np.asarray(ids, np.int64)
    out = np.zeros(len(ids))
    starts, ends = salient_runs(salient)
    if len(starts) == 0:
        return out
    uniq, inv, counts = np.unique(ids, return_inverse=True, return_counts=True)
    info = -np.log(counts[inv] / len(ids))
    keys = [tuple(ids[s:e + 1].tolist()) for s, e in zip(starts, ends)]
    recur: dict[tuple, int] = {}
    for k in keys:
        recur[k] = recur.get(k, 0) + 1
    for s, e, k in zip(starts, ends, keys):
        out[s:e + 1] = info[s:e + 1].sum() / recur[k]
    return out


def run_order(positions: np.ndarray, salient: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """Runs by priority (the largest value of ``salient`` in the run; all equal for a bool
    mask), then the largest window attention any of their tokens gets, then newest first."""
    starts, ends = salient_runs(np.asarray(salient) > 0)
    if len(starts) == 0:
        return np.zeros(0, np.int64)
    prio = np.asarray(salient, np.float64)
    rank = np.array([prio[s:e + 1].max() for s, e in zip(starts, ends)])
    best = np.array([strength[s:e + 1].max() for s, e in zip(starts, ends)])
    return np.lexsort((-np.asarray(positions)[starts], -best, -rank)).astype(np.int64)


def salient_positions(positions: np.ndarray, salient: np.ndarray, strength: np.ndarray, *,
                      before: int, after: int, cap: int) -> np.ndarray:
    """Positions to protect: salient runs with their context, at most ``cap`` of them.

    ``positions`` ascending with ``salient`` (bool, or :func:`run_priority`) and
    ``strength`` (per position, e.g. the best window attention share any head gives it)
    aligned to it.
    """
    if cap <= 0 or len(positions) == 0:
        return np.zeros(0, np.int64)
    order = run_order(positions, salient, strength)
    if len(order) == 0:
        return np.zeros(0, np.int64)
    return run_positions(positions, salient, order, before, after, cap)
