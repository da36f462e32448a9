"""Evicted attention mass: kept slots that stand for the tokens evicted beside them.

Eviction removes tokens from a layer's softmax. What stays (the kept slots and the recent
tokens, the question among them) then shares all of the attention the evicted tokens
held: a later query that spread part of its attention over the document gives that part
to the recent tokens instead. In the multi-question protocol this is what a wrong answer
looks like: the model repeats the answer it gave a turn earlier, which is recent.

A slot can stand for ``n`` tokens: the runtime adds ``log n`` to its attention logit (the
same attention as ``n`` copies of it). Here every kept slot of a KV head that is not a
protected start token stands for an equal part of the tokens its head held before the
plan (its own and those it drops): the document keeps its weight against what comes after
it, and the ranking among kept tokens is what the plan chose. Counts carry over from plan
to plan: an old slot that already stood for ``n`` tokens counts as ``n`` when the next plan
shares them out. Protected tokens (sinks, the conversation's start) take no share: a new
one stands for itself, one that was unprotected in an earlier plan (the protected start
grows with the budget) keeps what it stood for.

``share`` scales the equal part: 1 gives back as much attention as the evicted tokens
would have had if they resembled the kept ones; below 1, less (the evicted tokens scored
lower by construction).

``spread="nearest"`` shares the same total differently: each evicted token goes to the kept
slot nearest to it in position, and a slot stands for ``share`` of the tokens it was given
(itself included). A kept token inside a run the plan kept whole (a key, a name) then
stands for about itself, and one kept in a long evicted stretch for much of that stretch:
the attention the evicted tokens held returns to tokens of their own part of the text,
whose values resemble theirs, instead of to every kept token alike (numbers and names
included, whose values then weigh in wherever a query spreads its attention).
"""

from __future__ import annotations

import numpy as np

from .plan import LayerStore

#: Largest count a slot holds (the runtime stores it in one byte).
MAX_COUNT = 255

#: How the kept slots share the evicted tokens (:func:`weigh_store`).
SPREADS = ("equal", "nearest")


def equal_counts(held: float, kept: int, share: float) -> np.ndarray:
    """uint8 [kept]: tokens each of ``kept`` slots stands for when they share ``share`` of
    ``held`` tokens equally. The total is kept exactly (the remainder of the division goes
    one token each to slots spread evenly), as long as each slot's part is in ``[1, MAX_COUNT]``."""
    if kept <= 0:
        return np.zeros(0, dtype=np.uint8)
    total = int(np.rint(share * held))
    q, r = divmod(total, kept)
    c = np.full(kept, q, dtype=np.int64)
    c[(np.arange(r) * kept) // max(r, 1)] += 1
    return np.clip(c, 1, MAX_COUNT).astype(np.uint8)


def nearest_counts(kept_pos: np.ndarray, kept_count: np.ndarray, lost_pos: np.ndarray,
                   lost_count: np.ndarray, share: float) -> np.ndarray:
    """uint8 [len(kept_pos)]: what each kept slot (positions ascending) stands for when every
    evicted token (``lost_pos``, standing for ``lost_count`` tokens) goes to the kept slot
    nearest to it in position (the earlier one on a tie) and a slot stands for ``share`` of
    what it was given, its own ``kept_count`` included. The total, ``share`` times all the
    tokens, is kept exactly (largest remainders round up), as long as each part is in
    ``[1, MAX_COUNT]``."""
    k = len(kept_pos)
    if k == 0:
        return np.zeros(0, dtype=np.uint8)
    given = np.asarray(kept_count, dtype=np.float64).copy()
    if len(lost_pos):
        kp = np.asarray(kept_pos, dtype=np.int64)
        lp = np.asarray(lost_pos, dtype=np.int64)
        right = np.clip(np.searchsorted(kp, lp), 0, k - 1)
        left = np.clip(right - 1, 0, k - 1)
        nearest = np.where(np.abs(lp - kp[left]) <= np.abs(kp[right] - lp), left, right)
        np.add.at(given, nearest, np.asarray(lost_count, dtype=np.float64))
    x = share * given
    c = np.floor(x).astype(np.int64)
    r = int(np.rint(x.sum())) - int(c.sum())
    if r > 0:
        c[np.argsort(-(x - c), kind="stable")[:r]] += 1
    return np.clip(c, 1, MAX_COUNT).astype(np.uint8)


def weigh_store(store: LayerStore, positions: np.ndarray, available: np.ndarray | None,
                count: np.ndarray | None, protected: int, share: float, spread: str = "equal") -> None:
    """Set ``count`` on every KV head of ``store`` (in place).

    ``positions`` [n], ``available`` bool [n, Hkv] (None: all) and ``count`` [n, Hkv]
    (None: 1 each) describe the plan's candidates for the layer; the store's heads name
    their rows in ``token_index``. A head held the available candidates, each standing for
    its ``count``. Its kept unprotected slots (position >= ``protected``) share the tokens
    of the unprotected candidates equally (:func:`equal_counts`); a protected slot keeps
    what it stood for (1 for a new token). From plan to plan the counts of a head add up to
    the tokens that have left the regular cache. ``spread="nearest"`` shares the same total
    by position instead (:func:`nearest_counts`)."""
    if spread not in SPREADS:
        raise ValueError(f"mass.spread must be one of {', '.join(SPREADS)}, not {spread!r}")
    pos = np.asarray(positions)
    free = pos >= protected
    for h, hs in enumerate(store.heads):
        if hs.n_slots == 0:
            continue
        mine = free if available is None else free & np.asarray(available)[:, h]
        held = float(mine.sum()) if count is None else float(np.asarray(count)[mine, h].sum())
        kept_free = np.asarray(hs.positions) >= protected
        c = np.ones(hs.n_slots, dtype=np.uint8)
        if count is not None and hs.token_index is not None:
            c[~kept_free] = np.clip(np.asarray(count)[hs.token_index[~kept_free], h], 1, MAX_COUNT)
        if spread == "equal":
            c[kept_free] = equal_counts(held, int(kept_free.sum()), share)
        else:
            cnt = np.ones(len(pos), dtype=np.int64) if count is None else np.asarray(count)[:, h]
            rows = _kept_rows(hs, pos)[kept_free]  # candidate row of each kept unprotected slot
            lost = mine.copy()
            lost[rows] = False
            c[kept_free] = nearest_counts(pos[rows], cnt[rows], pos[lost], cnt[lost], share)
        hs.count = c if (c > 1).any() else None


def _kept_rows(hs, positions: np.ndarray) -> np.ndarray:
    """The candidate row of each of ``hs``'s slots: ``token_index``, or the row at the slot's
    position when the store does not name them (a head holds a position once)."""
    if hs.token_index is not None:
        return np.asarray(hs.token_index, dtype=np.int64)
    order = np.argsort(positions, kind="stable")
    return order[np.searchsorted(np.asarray(positions)[order], np.asarray(hs.positions))]
