"""Evicted mass (policy/mass.py): kept slots of deep layers stand for the tokens evicted beside them."""

from __future__ import annotations

import numpy as np
import pytest

from spindle_local.policy import Geometry, make_policy
from spindle_local.policy.mass import MAX_COUNT, equal_counts, weigh_store
from spindle_local.policy.plan import HeadStore, LayerStore
from spindle_local.policy.stages import EvictedMass, PlanContext
from spindle_local.policy.synthetic import make_layers

GEO = Geometry(n_layer=6, n_head=6, n_head_kv=2, head_dim_k=16, head_dim_v=16)


def test_equal_counts_keep_the_total() -> None:
    assert equal_counts(100, 10, 1.0).tolist() == [10] * 10
    assert equal_counts(100, 10, 0.5).tolist() == [5] * 10
    c = equal_counts(107, 10, 1.0)
    assert int(c.sum()) == 107 and set(c.tolist()) == {10, 11}
    assert np.flatnonzero(c == 11).tolist() == [0, 1, 2, 4, 5, 7, 8]  # spread, not bunched
    assert equal_counts(5, 10, 1.0).tolist() == [1] * 10  # never below one token
    assert equal_counts(10**6, 3, 1.0).tolist() == [MAX_COUNT] * 3
    assert len(equal_counts(50, 0, 1.0)) == 0


def _head(positions) -> HeadStore:
    p = np.asarray(positions, dtype=np.int32)
    return HeadStore(positions=p, qmask=np.ones((3, len(p)), dtype=bool))


def test_weigh_store_shares_held_tokens_over_unprotected_slots() -> None:
    positions = np.arange(20, dtype=np.int32)
    avail = np.ones((20, 2), dtype=bool)
    avail[10:, 1] = False  # head 1 held only positions 0..9
    st = LayerStore(layer=5, heads=[_head([0, 1, 8, 15]), _head([0, 1, 5])])
    weigh_store(st, positions, avail, None, protected=2, share=1.0)
    # head 0: 18 unprotected tokens held, 2 unprotected slots kept -> 9 each; sinks stay 1
    assert st.heads[0].count.tolist() == [1, 1, 9, 9]
    # head 1: 8 held (positions 2..9), one slot -> 8
    assert st.heads[1].count.tolist() == [1, 1, 8]


def test_weigh_store_carries_earlier_counts() -> None:
    positions = np.arange(12, dtype=np.int32)
    count = np.ones((12, 1), dtype=np.int32)
    count[4] = 7  # an old slot that already stood for 7 tokens
    count[1] = 3  # a slot that stood for 3 before the protected start grew over it
    st = LayerStore(layer=0, heads=[_head([0, 1, 4, 9])])
    st.heads[0].token_index = np.array([0, 1, 4, 9])
    weigh_store(st, positions, None, count, protected=2, share=1.0)
    # held: 9 ones + 7 = 16 over two unprotected slots -> 8 each; position 1 keeps its 3
    assert st.heads[0].count.tolist() == [1, 3, 8, 8]


def test_weigh_store_leaves_whole_layers_alone() -> None:
    positions = np.arange(6, dtype=np.int32)
    st = LayerStore(layer=0, heads=[_head(positions)])
    weigh_store(st, positions, None, None, protected=2, share=1.0)
    assert st.heads[0].count is None  # every token kept: each stands for itself


def test_visibility_roundtrip() -> None:
    hs = _head([3, 4, 5])
    hs.qmask[1, 0] = False
    hs.count = np.array([2, 1, 5], dtype=np.uint8)
    vis = hs.visibility()
    assert vis.tolist() == [[2, 1, 5], [0, 1, 5], [2, 1, 5]]
    qmask, count = HeadStore.split_visibility(vis)
    assert (qmask == hs.qmask).all() and count.tolist() == [2, 1, 5]
    qmask, count = HeadStore.split_visibility(hs.qmask.astype(np.uint8))
    assert count is None


def test_mass_stage_changes_counts_not_selection() -> None:
    layers = make_layers(GEO, n=160, w=8, r=12, seed=1)
    target = 40_000
    ctx = PlanContext(sinks=4)
    plain = make_policy("spindle", {}, ctx).plan(layers, GEO, target)
    weighed = make_policy("spindle", {"mass": "on", "mass.from_layer": 3, "mass.share": 1.0}, ctx).plan(
        layers, GEO, target)
    first = EvictedMass(from_layer=3).first_layer(GEO.n_layer)
    for a, b, inp in zip(plain, weighed, layers):
        for ha, hb in zip(a.heads, b.heads):
            assert (ha.positions == hb.positions).all() and (ha.qmask == hb.qmask).all()
        if inp.layer < first:
            assert all(h.count is None for h in b.heads)
            continue
        for h, hs in enumerate(b.heads):
            assert hs.count is not None
            free = hs.positions >= 4
            held = int((inp.positions >= 4).sum())
            # the kept slots stand for exactly what the head held
            assert int(hs.count[free].sum()) == held
            assert (hs.count[~free] == 1).all()


def test_default_first_layer_is_two_thirds_down() -> None:
    assert EvictedMass().first_layer(30) == 20
    assert EvictedMass().first_layer(26) == 18
    with pytest.raises(ValueError):
        EvictedMass(share=0)
