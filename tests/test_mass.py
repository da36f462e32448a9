"""Evicted mass (policy/mass.py): kept slots of deep layers stand for the tokens evicted beside them."""

from __future__ import annotations

import numpy as np
import pytest

from spindle_local.policy import Geometry, make_policy
from spindle_local.policy.mass import MAX_COUNT, equal_counts, nearest_counts, weigh_store
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


def test_nearest_counts_give_each_evicted_token_to_the_nearest_kept_slot() -> None:
    kept = np.array([10, 20, 50])
    lost = np.array([0, 5, 14, 15, 16, 30, 36, 60, 90])
    # nearest: 0, 5 -> 10; 14, 15 -> 10 (15 ties: the earlier); 16 -> 20; 30 -> 20; 36 -> 50; 60, 90 -> 50
    c = nearest_counts(kept, np.ones(3), lost, np.ones(len(lost)), 1.0)
    assert c.tolist() == [5, 3, 4]
    assert int(c.sum()) == len(kept) + len(lost)  # share 1: every token accounted for
    # earlier counts carry: a kept slot that stood for 6, an evicted one that stood for 9
    c = nearest_counts(kept, np.array([6, 1, 1]), np.array([45]), np.array([9]), 1.0)
    assert c.tolist() == [6, 1, 10]
    # share 0.5 keeps the halved total exactly (largest remainders round up), never below 1
    c = nearest_counts(kept, np.ones(3), lost, np.ones(len(lost)), 0.5)
    assert int(c.sum()) == 6 and c.min() >= 1 and c.tolist() == [3, 1, 2]
    assert nearest_counts(kept, np.ones(3), np.zeros(0), np.zeros(0), 1.0).tolist() == [1, 1, 1]
    assert nearest_counts(np.array([3]), np.ones(1), np.arange(1000), np.ones(1000), 1.0).tolist() == [MAX_COUNT]
    assert len(nearest_counts(np.zeros(0), np.zeros(0), lost, np.ones(len(lost)), 1.0)) == 0


def test_nearest_counts_match_a_plain_loop() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        pos = rng.permutation(400)[:120]
        kept, lost = np.sort(pos[:30]), pos[30:]
        kc, lc = rng.integers(1, 5, 30), rng.integers(1, 5, 90)
        given = kc.astype(float).copy()
        for p, n in zip(lost, lc):
            d = np.abs(kept - p)
            given[int(np.flatnonzero(d == d.min())[0])] += n  # the earlier slot on a tie
        c = nearest_counts(kept, kc, lost, lc, 1.0)
        assert c.tolist() == np.clip(given, 1, MAX_COUNT).astype(int).tolist()


def test_weigh_store_nearest_spread_keeps_the_total_of_equal() -> None:
    positions = np.arange(40, dtype=np.int32)
    st_eq = LayerStore(layer=5, heads=[_head([0, 1, 10, 11, 12, 35])])
    st_nn = LayerStore(layer=5, heads=[_head([0, 1, 10, 11, 12, 35])])
    weigh_store(st_eq, positions, None, None, protected=2, share=1.0)
    weigh_store(st_nn, positions, None, None, protected=2, share=1.0, spread="nearest")
    assert int(st_eq.heads[0].count[2:].sum()) == 38  # equal parts of the same 38 tokens
    nn = st_nn.heads[0].count.tolist()
    assert sum(nn[2:]) == 38 and nn[:2] == [1, 1]
    # 2..10 -> slot 10 (9), 11 alone, 12..23 -> 12 (12; 23 is nearer to 12 than to 35), 24..39 -> 35 (16)
    assert nn[2:] == [9, 1, 12, 16]
    with pytest.raises(ValueError):
        weigh_store(st_nn, positions, None, None, protected=2, share=1.0, spread="random")


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


@pytest.mark.parametrize("spread", ["equal", "nearest"])
def test_mass_stage_changes_counts_not_selection(spread: str) -> None:
    layers = make_layers(GEO, n=160, w=8, r=12, seed=1)
    target = 40_000
    ctx = PlanContext(sinks=4)
    plain = make_policy("spindle", {}, ctx).plan(layers, GEO, target)
    weighed = make_policy("spindle", {"mass": "on", "mass.from_layer": 3, "mass.share": 1.0,
                                          "mass.spread": spread}, ctx).plan(
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
