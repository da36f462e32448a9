"""Kernels of the policy (numba, or vectorised numpy) agree with their plain references."""

from __future__ import annotations

import numpy as np
import pytest

from spindle_local.policy.codebook import (
    _greedy_cover_nb,
    build_codebook,
    greedy_cover_ref,
    split_magnitude,
)
from spindle_local.policy.inputs import Geometry
from spindle_local.policy.stages import WindowScorer
from spindle_local.policy.roles import _attn_out_nb, attn_out_ref
from spindle_local.policy.scores import (
    _softmax_colmean_nb,
    attention_logits,
    attention_logits_ref,
    layer_logits,
    pool_ref,
    pool_scores,
    pool_window_scores,
    raw_window_scores,
    softmax_colmean_ref,
    window_scores,
)
from spindle_local.policy.select import union_priority, union_select, union_select_ref
from spindle_local.policy.synthetic import make_layer


def clustered(rng, n, d, n_clusters, noise):
    c = rng.standard_normal((n_clusters, d)).astype(np.float32)
    x = c[rng.integers(0, n_clusters, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return x * rng.uniform(0.5, 2.0, (n, 1)).astype(np.float32)


def test_logits_agree():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((8, 6, 16)).astype(np.float32)
    k = rng.standard_normal((50, 2, 16)).astype(np.float32)
    np.testing.assert_allclose(attention_logits(q, k, 3, 0.25), attention_logits_ref(q, k, 3, 0.25), atol=1e-5)


def test_softmax_colmean_agree_with_causal_mask():
    rng = np.random.default_rng(1)
    h, w, n, r = 4, 6, 40, 9
    lo = rng.standard_normal((h, w, n)).astype(np.float32) * 3
    lr = rng.standard_normal((h, w, r)).astype(np.float32) * 3
    pos_old = np.sort(rng.choice(100, n, replace=False)).astype(np.int64)
    q_pos = np.sort(rng.choice(np.arange(30, 120), w, replace=False)).astype(np.int64)
    pos_rec = np.sort(rng.choice(np.arange(100, 130), r, replace=False)).astype(np.int64)
    a = _softmax_colmean_nb(lo, lr, q_pos, pos_old, pos_rec)
    b = softmax_colmean_ref(lo, lr, q_pos, pos_old, pos_rec)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # tokens no window query can see score 0
    assert np.all(a[:, pos_old > q_pos.max()] == 0)


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("kernel", [1, 4, 7])
def test_pooling_agree(mode, kernel):
    s = np.random.default_rng(2).random((3, 23)).astype(np.float32)
    out = pool_scores(s, kernel, mode)
    np.testing.assert_allclose(out, pool_ref(s, kernel, mode), rtol=1e-6)
    assert out.shape == s.shape and out.dtype == s.dtype
    if kernel > 1:
        assert not np.allclose(out, s)


CTX = {"sinks": 4, "scale": 0.25}  # 1/sqrt(16)


def test_window_scores_numba_vs_numpy():
    geo = Geometry(4, 6, 2, 16, 16)
    inp = make_layer(geo, 3, n=80, w=8, r=12, seed=3)
    for pooling in ("none", "max", "avg"):
        sc = WindowScorer(pooling=pooling, kernel=5)
        np.testing.assert_allclose(
            window_scores(inp, geo, sc, **CTX), window_scores(inp, geo, sc, **CTX, use_numba=False),
            rtol=1e-5, atol=1e-8
        )


def test_scores_one_group_at_a_time_equal_the_whole_layer():
    # plans score a layer one GQA group at a time (its logits are a g-th of the layer's)
    geo = Geometry(4, 6, 2, 16, 16)
    inp = make_layer(geo, 3, n=80, w=8, r=12, seed=4)
    avail = np.ones((inp.n, 2), bool)
    avail[::3, 1] = False
    inp.available = avail
    sc = WindowScorer(pooling="none")
    by_group = raw_window_scores(inp, geo, sc, scale=0.25)
    whole = raw_window_scores(inp, geo, sc, scale=0.25, logits=layer_logits(inp, geo, sc, 0.25))
    assert np.array_equal(by_group, whole)
    assert (by_group[3:, ::3] == 0).all() and (by_group[:3, ::3] > 0).any()


def test_pooled_scores_are_pooled_raw_attention():
    # copy spans read the attention before pooling; the plan's scores are that, pooled
    geo = Geometry(4, 6, 2, 16, 16)
    inp = make_layer(geo, 3, n=80, w=8, r=12, seed=5)
    sc = WindowScorer(pooling="max", kernel=7)
    raw = raw_window_scores(inp, geo, sc, scale=0.25)
    pooled = pool_window_scores(raw, inp, sc, sinks=4)
    np.testing.assert_allclose(pooled, window_scores(inp, geo, sc, **CTX), rtol=1e-6)
    assert np.array_equal(raw, raw_window_scores(inp, geo, sc, scale=0.25))  # pooling works on a copy
    body = raw[:, np.asarray(inp.positions) >= 4]
    assert (pooled[:, np.asarray(inp.positions) >= 4] >= body - 1e-7).all()  # max-pool never lowers
    assert not np.allclose(pooled, raw)
    np.testing.assert_allclose(raw.sum(axis=1), raw_window_scores(inp, geo, sc, scale=0.25, use_numba=False).sum(axis=1),
                               rtol=1e-5)


def test_union_select_agree_and_priority_prefix():
    rng = np.random.default_rng(4)
    for trial in range(20):
        g, n = int(rng.integers(1, 5)), int(rng.integers(1, 60))
        sc = rng.random((g, n)).astype(np.float32)
        sc[:, : min(2, n)] = np.inf  # protected
        if trial % 3 == 0:
            sc = np.round(sc, 1)  # ties
        for s in {0, 1, n // 3, n // 2, n - 1, n}:
            s = max(0, s)
            a_sel, a_mask = union_select(sc, s)
            b_sel, b_mask = union_select_ref(sc, s)
            assert np.array_equal(a_sel, b_sel) and np.array_equal(a_mask, b_mask)
            assert len(a_sel) == min(s, n)
            if s < n:
                assert set(union_priority(sc)[:s].tolist()) == set(a_sel.tolist())


@pytest.mark.parametrize("block", [256, 1])  # block=1: edge buffer overflows -> recompute path
def test_greedy_cover_agree(block):
    rng = np.random.default_rng(5)
    for n_clusters, noise in ((10, 0.1), (40, 0.3), (300, 1.0)):
        x = clustered(rng, 300, 16, n_clusters, noise)
        _, u = split_magnitude(x)
        a_assign, a_centres = _greedy_cover_nb(u, 0.95, block)
        b_assign, b_centres = greedy_cover_ref(u, 0.95)
        assert np.array_equal(a_assign, b_assign)
        assert np.array_equal(a_centres, b_centres)


def test_attn_out_agree():
    rng = np.random.default_rng(8)
    lg = rng.standard_normal((5, 30)).astype(np.float32) * 2
    kp = np.sort(rng.choice(60, 30, replace=False)).astype(np.int64)
    qp = np.array([10, 20, 40, 59, 70], dtype=np.int64)
    v = rng.standard_normal((30, 8)).astype(np.float32)
    np.testing.assert_allclose(_attn_out_nb(lg, kp, qp, v), attn_out_ref(lg, kp, qp, v), rtol=1e-5, atol=1e-9)
