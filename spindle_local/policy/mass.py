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
"""

from __future__ import annotations

import numpy as np

from .plan import LayerStore

#: Largest count a slot holds (the runtime stores it in one byte).
MAX_COUNT = 255


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


def weigh_store(store: LayerStore, positions: np.ndarray, available: np.ndarray | None,
                count: np.ndarray | None, protected: int, share: float) -> None:
    """Set ``count`` on every KV head of ``store`` (in place).

    ``positions`` [n], ``available`` bool [n, Hkv] (None: all) and ``count`` [n, Hkv]
    (None: 1 each) describe the plan's candidates for the layer; the store's heads name
    their rows in ``token_index``. A head held the available candidates, each standing for
    its ``count``. Its kept unprotected slots (position >= ``protected``) share the tokens
    of the unprotected candidates equally (:func:`equal_counts`); a protected slot keeps
    what it stood for (1 for a new token). From plan to plan the counts of a head add up to
    the tokens that have left the regular cache."""
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
        c[kept_free] = equal_counts(held, int(kept_free.sum()), share)
        hs.count = c if (c > 1).any() else None
