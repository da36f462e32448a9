"""Copy spans (policy/anchors.py): anchors from deep heads' window attention, the run
after each kept in every KV head of the deep layers, within a share of the budget."""

from __future__ import annotations

import numpy as np
import pytest

from spindle_local.policy import Geometry, make_policy
from spindle_local.policy.anchors import (
    anchor_strength,
    boost,
    copy_spans,
    layer_strength,
    span_positions,
    span_positions_ref,
)
from spindle_local.policy.synthetic import make_layers

GEO = Geometry(n_layer=6, n_head=6, n_head_kv=2, head_dim_k=16, head_dim_v=16)


@pytest.mark.parametrize("seed", range(6))
def test_span_kernel_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    positions = np.sort(rng.choice(2000, size=n, replace=False)).astype(np.int64)  # gaps, as in a store
    order = rng.permutation(n)[: int(rng.integers(0, n + 1))]
    for span in (0, 3, 24):
        for cap in (0, 5, 40, 10_000):
            got = span_positions(positions, order, span, cap)
            ref = span_positions_ref(positions, order, span, cap)
            assert np.array_equal(got, ref), (span, cap)
            assert len(got) <= cap


def test_copy_spans_follow_the_strongest_deep_anchor() -> None:
    layers = make_layers(GEO, n=200, w=8, r=12, seed=2)
    scores = [np.full((GEO.n_head, inp.n), 1.0, np.float32) for inp in layers]
    scores[4][2, 50] = 400.0  # one deep query head puts most of its attention on position 50
    scores[1][0, 120] = 4000.0  # a shallow one does too, more strongly: not a deep anchor
    strengths = [layer_strength(sc, inp.positions, 4) for inp, sc in zip(layers, scores)]
    kept = copy_spans(layers, strengths, first_layer=3, span=10, cap=30, min_share=0.05)
    assert np.array_equal(kept, np.arange(50, 61))
    pos, strength = anchor_strength(layers, strengths, 3)
    assert pos[np.argmax(strength)] == 50
    # nothing reaches the threshold: no spans; a cap below one run: no spans
    assert len(copy_spans(layers, strengths, first_layer=3, span=10, cap=30, min_share=0.9)) == 0
    assert len(copy_spans(layers, strengths, first_layer=3, span=10, cap=5, min_share=0.05)) == 0


def test_layer_strength_is_the_best_head_share_and_ignores_sinks() -> None:
    s = np.array([[9.0, 1.0, 3.0, np.inf], [5.0, 4.0, 1.0, -np.inf]], np.float32)
    got = layer_strength(s, np.array([0, 5, 6, 7]), sinks=1)  # position 0 is a sink
    # head 0: shares 0, 1/4, 3/4, 0; head 1: 0, 4/5, 1/5, 0
    assert np.allclose(got, [0.0, 0.8, 0.75, 0.0])


def test_a_run_that_does_not_fit_is_skipped_not_the_end() -> None:
    # The strongest anchor is often a token just before the recent part (local attention):
    # its run is short. A run that no longer fits the cap must not stop the search, or the
    # needle's run behind it is lost (a 1,500-token prompt at budget 0.15 kept 7 tokens).
    positions = np.arange(100, dtype=np.int64)
    order = np.array([95, 40, 93])  # strongest first: a short run at the end, a full one, a short one
    kept = span_positions(positions, order, 10, 8)
    assert np.array_equal(kept, np.arange(93, 100))  # 40's run (11) passes the cap; 93's still fits
    assert np.array_equal(kept, span_positions_ref(positions, order, 10, 8))
    kept = span_positions(positions, order, 10, 18)
    assert np.array_equal(kept, np.concatenate([np.arange(40, 51), np.arange(93, 100)]))


def test_boost_ranks_spans_first_but_keeps_sinks_and_absent_pairs() -> None:
    s = np.array([[np.inf, 5.0, 0.1, -np.inf, 0.2], [np.inf, 0.3, 9.0, 0.0, -np.inf]], np.float32)
    pos = np.array([0, 10, 11, 12, 13])
    out = boost(s, pos, np.array([12, 13]))
    assert np.isposinf(out[:, 0]).all()
    assert np.isneginf(out[0, 3]) and np.isneginf(out[1, 4])  # absent stays absent
    assert out[0, 4] > out[0, 1] and out[1, 3] > out[1, 2]  # protected above every finite score
    assert np.array_equal(out[:, 1:3], s[:, 1:3])


def test_spindle_keeps_copy_spans_in_every_deep_head() -> None:
    layers = make_layers(GEO, n=400, w=8, r=12, seed=3)
    cfg = {"codebooks": "off", "copy_spans.span": 12, "copy_spans.share": 0.3, "copy_spans.from_layer": 3,
           "copy_spans.min_share": 0.0}
    pol = make_policy("spindle", cfg)
    target = int(0.2 * sum(inp.n for inp in layers) * GEO.n_head_kv * 2 * (GEO.head_dim_k + GEO.head_dim_v))
    stores = pol.plan(layers, GEO, target)
    # the spans the policy protected, recomputed from its own scores
    # anchors come from window attention before pooling (max-pooling would move a span's start)
    raw = [pol._raw_and_scores(inp, GEO)[0] for inp in layers]
    # the greedy choice under the policy's cap equals the one under the count it reached
    used = pol.last_report[3]["copy_span_tokens"]
    slots = np.array([st.heads[0].n_slots for st in stores])
    assert used <= 0.3 * slots.mean() + 1
    strengths = [layer_strength(r, inp.positions, 4) for inp, r in zip(layers, raw)]
    kept = copy_spans(layers, strengths, first_layer=3, span=12, cap=used, min_share=0.0)
    assert len(kept) == used
    assert len(kept) >= 12
    for st in stores[3:]:
        for hs in st.heads:
            assert set(kept.tolist()) <= set(hs.positions.tolist())
    # without copy spans the deep heads do not all hold them: the option changes the plan
    off = make_policy("spindle", {"codebooks": "off", "copy_spans": "off"}).plan(layers, GEO, target)
    assert any(not set(kept.tolist()) <= set(hs.positions.tolist()) for st in off[3:] for hs in st.heads)
