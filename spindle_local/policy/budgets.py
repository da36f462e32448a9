"""Per-layer budgets: flat and pyramid schedules, turned into slot counts by the byte formula.

Budgets are bytes in the end (``target_bytes`` for the whole store, measured with
:func:`~spindle_local.policy.plan.layer_store_bytes`). For raw (eviction) layers one slot
costs the same in every layer, so a schedule is allocated in slots: ``S_l =
clip(lambda * w_l, lo_l, hi_l)`` with ``lo_l`` the layer's sinks (never evicted) and
``hi_l`` its token count, ``lambda`` found by bisection so that the slots fill the budget,
then rounded down with the remainder handed out by largest fractional part. Capping at
``hi_l`` and raising to ``lo_l`` hands the difference to the other layers, so the schedule
keeps its shape where it can and the budget is always used up to the last slot.
"""

from __future__ import annotations

import numpy as np

from .inputs import Geometry
from .plan import F16_BYTES, INDEX_BYTES, MAG_BYTES, MASK_BYTES, POS_BYTES


def raw_slot_bytes(geometry: Geometry) -> int:
    """Bytes one raw slot costs in one layer (all KV heads): position, masks, f16 K and V rows."""
    g = geometry.g
    per_head = POS_BYTES + g * MASK_BYTES + (geometry.head_dim_k + geometry.head_dim_v) * F16_BYTES
    return geometry.n_head_kv * per_head


def codebook_layer_bytes(
    geometry: Geometry, n_slots: int, k_entries: int | None, v_entries: int | None
) -> int:
    """Bytes of a layer with ``n_slots`` slots per KV head; ``*_entries`` None means raw.

    ``k_entries``/``v_entries`` are summed over the layer's KV heads. Mirrors
    ``layer_store_bytes`` (checked in the tests) so that a size can be known before the
    plan objects exist.
    """
    if n_slots == 0:
        return 0
    hkv, g = geometry.n_head_kv, geometry.g
    total = hkv * n_slots * (POS_BYTES + g * MASK_BYTES)
    for d, e in ((geometry.head_dim_k, k_entries), (geometry.head_dim_v, v_entries)):
        if e is None:
            total += hkv * n_slots * d * F16_BYTES
        else:
            total += e * d * F16_BYTES + hkv * n_slots * (INDEX_BYTES + MAG_BYTES)
    return total


def pyramid_weights(n_layer: int, beta: float) -> np.ndarray:
    """Linearly decreasing layer weights with mean 1; the deepest layer gets ``1/beta``.

    Same shape as PyramidKV: top ``2 - 1/beta``, bottom ``1/beta``. ``beta = 1`` is flat.
    """
    if n_layer <= 1:
        return np.ones(max(n_layer, 0))
    lo = 1.0 / beta
    hi = 2.0 - lo
    return hi - (hi - lo) * np.arange(n_layer) / (n_layer - 1)


def allocate_slots(
    weights: np.ndarray, lo: np.ndarray, hi: np.ndarray, total_slots: int
) -> np.ndarray:
    """Integer slots per layer following ``weights`` within ``[lo, hi]`` with sum <= ``total_slots``.

    Raises ValueError when even ``lo`` does not fit. Uses the whole budget unless every
    layer reaches ``hi``.
    """
    weights = np.asarray(weights, dtype=np.float64)
    lo = np.asarray(lo, dtype=np.int64)
    hi = np.maximum(np.asarray(hi, dtype=np.int64), lo)
    if lo.sum() > total_slots:
        raise ValueError(
            f"budget of {total_slots} slots cannot hold the {int(lo.sum())} protected (sink) slots"
        )
    if hi.sum() <= total_slots:
        return hi.copy()

    def filled(lam: float) -> np.ndarray:
        return np.clip(lam * weights, lo, hi)

    a, b = 0.0, 1.0
    while filled(b).sum() < total_slots:
        b *= 2.0
        if b > 1e18:
            break
    for _ in range(200):
        m = 0.5 * (a + b)
        if filled(m).sum() <= total_slots:
            a = m
        else:
            b = m
    cont = filled(a)
    slots = np.floor(cont).astype(np.int64)
    slots = np.clip(slots, lo, hi)
    rest = int(total_slots - slots.sum())
    if rest > 0:
        frac = cont - np.floor(cont)
        # hand out the rest by largest fractional part, then by weight, to layers below hi
        order = np.lexsort((-weights, -frac))
        while rest > 0:
            progressed = False
            for i in order:
                if rest == 0:
                    break
                if slots[i] < hi[i]:
                    slots[i] += 1
                    rest -= 1
                    progressed = True
            if not progressed:
                break
    assert slots.sum() <= total_slots
    return slots


def sink_slots(positions: np.ndarray, sinks: int) -> int:
    """Number of protected tokens among ``positions`` (those with position < ``sinks``)."""
    return int(np.count_nonzero(np.asarray(positions) < sinks))


def mass_slots(
    gains: list[np.ndarray], lo: np.ndarray, hi: np.ndarray, floor: np.ndarray, total_slots: int
) -> np.ndarray:
    """Slots per layer that keep the most window attention mass, each layer at least ``floor``.

    ``gains[l][t]`` is what layer ``l``'s slot ``lo[l] + t`` (in its selection order) would
    retain, summed over the layer's heads; it is made non-increasing so that every layer
    keeps a prefix. Slots beyond ``floor`` go to the largest gains over all layers (a
    global top-k), which is optimal for the summed mass. Same contract as
    :func:`allocate_slots`: ``lo <= slots <= hi`` and ``sum <= total_slots``, using the
    whole budget unless every layer reaches ``hi``.
    """
    lo = np.asarray(lo, dtype=np.int64)
    hi = np.maximum(np.asarray(hi, dtype=np.int64), lo)
    base = np.clip(np.asarray(floor, dtype=np.int64), lo, hi)
    if base.sum() > total_slots:
        return allocate_slots(np.maximum(np.asarray(floor, dtype=np.float64), 1e-9), lo, hi, total_slots)
    if hi.sum() <= total_slots:
        return hi.copy()
    rest = int(total_slots - base.sum())
    vals, owner = [], []
    for l, gl in enumerate(gains):
        g = np.asarray(gl, dtype=np.float64)[: hi[l] - lo[l]]
        if len(g) < hi[l] - lo[l]:
            g = np.concatenate([g, np.zeros(hi[l] - lo[l] - len(g))])
        g = np.minimum.accumulate(np.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)) if len(g) else g
        cand = g[base[l] - lo[l]:]
        vals.append(cand)
        owner.append(np.full(len(cand), l, dtype=np.int64))
    if rest <= 0 or not vals:
        return base
    v = np.concatenate(vals)
    o = np.concatenate(owner)
    take = min(rest, len(v))
    # stable: among equal gains, earlier layers first (deterministic)
    idx = np.argsort(-v, kind="stable")[:take]
    slots = base + np.bincount(o[idx], minlength=len(gains))
    assert slots.sum() <= total_slots and (slots <= hi).all()
    return slots
