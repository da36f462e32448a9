"""Policies: budgets respected exactly, sinks kept, GQA masks, roles, API errors."""

from __future__ import annotations

import numpy as np
import pytest

from spindle_local.policy.parallel import planning_threads
from spindle_local.policy import (
    POLICY_NAMES,
    Geometry,
    LayerInput,
    full_cache_bytes,
    layer_store_bytes,
    make_policy,
)
from spindle_local.policy.scores import window_scores
from spindle_local.policy.stages import PlanContext, WindowScorer
from spindle_local.policy.budgets import (
    allocate_slots,
    codebook_layer_bytes,
    pyramid_weights,
    raw_slot_bytes,
)
from spindle_local.policy.roles import RoleMemory
from spindle_local.policy.rope import infer_rope
from spindle_local.policy.synthetic import apply_rope, make_layer, make_layers

GEO = Geometry(n_layer=6, n_head=6, n_head_kv=2, head_dim_k=16, head_dim_v=16)
N = 160


@pytest.fixture(scope="module")
def layers():
    return make_layers(GEO, n=N, w=8, r=12, seed=1)


def policy(name: str = "spindle", *, sinks: int = 4, threads: int | None = None, **settings):
    """make_policy with stage settings written ``stage__field`` (``codebooks__layers=0``); a
    ``codebooks__*`` field turns the codebook stage on (the default preset has it off)."""
    cfg = {k.replace("__", "."): v for k, v in settings.items()}
    if any(k.startswith("codebooks.") for k in cfg):
        cfg.setdefault("codebooks", "on")
    return make_policy(name, cfg, PlanContext(sinks=sinks, threads=threads))


def scores_of(inp, geo=GEO, *, sinks: int = 4, **scorer):
    """Window scores of one layer with a WindowScorer of ``scorer``'s fields."""
    return window_scores(inp, geo, WindowScorer(**scorer), sinks=sinks, scale=1 / np.sqrt(geo.head_dim_k))


def total_bytes(stores, geo=GEO):
    return sum(layer_store_bytes(s, geo.head_dim_k, geo.head_dim_v) for s in stores)


def check_store(inp, st, geo=GEO):
    """Structural checks every layer store must pass."""
    assert len(st.heads) == geo.n_head_kv
    for h, hs in enumerate(st.heads):
        s = hs.n_slots
        assert hs.qmask.shape == (geo.g, s) and hs.qmask.dtype == bool
        assert np.all(np.diff(hs.positions) > 0)
        assert np.array_equal(hs.positions, inp.positions[hs.token_index])
        assert (hs.k_raw is None) != (hs.k_codebook is None)
        assert (hs.v_raw is None) != (hs.v_codebook is None)
        if hs.k_raw is not None:
            assert np.array_equal(hs.k_raw, inp.k[hs.token_index, h])
        if hs.v_raw is not None:
            assert np.array_equal(hs.v_raw, inp.v[hs.token_index, h])
        # every kept slot is visible to at least one query head
        assert s == 0 or hs.qmask.any(axis=0).all()
    # sinks kept and visible to every query head
    for hs in st.heads:
        sink_slots = hs.positions < 4
        assert sink_slots.sum() == np.count_nonzero(inp.positions < 4)
        assert hs.qmask[:, sink_slots].all()


CASES = [(name, None) for name in POLICY_NAMES] + [("spindle", 2), ("spindle", 0), ("spindle-paper", 2)]


@pytest.mark.parametrize("name,cb_layers", CASES)
@pytest.mark.parametrize("frac", [0.4, 0.25, 0.15])
def test_budget_respected_and_sinks_kept(layers, name, frac, cb_layers):
    target = int(full_cache_bytes(N, GEO.n_layer, GEO.n_head_kv, 16, 16) * frac)
    pol = policy(name) if cb_layers is None else policy(name, codebooks__layers=cb_layers)
    stores = pol.plan(layers, GEO, target)
    assert len(stores) == len(layers)
    if name != "full":
        assert total_bytes(stores) <= target
        # the budget is used: less than one raw slot per layer left over
        assert target - total_bytes(stores) < raw_slot_bytes(GEO) * GEO.n_layer + 200 * GEO.n_layer
    for inp, st in zip(layers, stores):
        assert st.layer == inp.layer
        check_store(inp, st)
    for row, st in zip(pol.last_report, stores):
        assert row["bytes"] == layer_store_bytes(st, 16, 16)


def test_full_keeps_everything_and_ignores_budget(layers):
    stores = make_policy("full").plan(layers, GEO, 1)
    for inp, st in zip(layers, stores):
        assert all(hs.n_slots == inp.n and hs.qmask.all() for hs in st.heads)


def test_streaming_keeps_sinks_and_most_recent(layers):
    target = int(full_cache_bytes(N, GEO.n_layer, 2, 16, 16) * 0.25)
    for inp, st in zip(layers, make_policy("streaming").plan(layers, GEO, target)):
        pos = st.heads[0].positions
        rest = pos[pos >= 4]
        assert np.array_equal(rest, inp.positions[-len(rest):])


@pytest.mark.parametrize("name", ["full", "streaming", "snapkv", "pyramidkv", "spindle"])
def test_impossible_budget_raises(layers, name):
    if name == "full":
        make_policy(name).plan(layers, GEO, 0)
        return
    sink_bytes = 4 * raw_slot_bytes(GEO) * GEO.n_layer
    with pytest.raises(ValueError, match="sink"):
        make_policy(name).plan(layers, GEO, sink_bytes - 1)
    stores = make_policy(name).plan(layers, GEO, sink_bytes)  # exactly the sinks fit
    assert total_bytes(stores) <= sink_bytes


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "streaming"])
def test_group_policies_share_slots(layers, name):
    target = int(full_cache_bytes(N, GEO.n_layer, 2, 16, 16) * 0.25)
    for st in make_policy(name).plan(layers, GEO, target):
        for hs in st.heads:
            assert hs.qmask.all()


def test_snapkv_uses_group_average():
    geo = Geometry(1, 2, 1, 8, 8)
    inp = make_layer(geo, 0, n=40, w=4, seed=2)
    # handcrafted disagreeing heads: inject scores by making queries match different keys
    q = np.zeros((4, 2, 8), np.float32)
    q[:, 0, :] = inp.k[10, 0] * 4
    q[:, 1, :] = inp.k[30, 0] * 4
    inp.q_window = q
    target = raw_slot_bytes(geo) * 6
    st = policy("snapkv", sinks=0, scorer__pooling="none").plan([inp], geo, target)[0]
    assert st.heads[0].qmask.all()
    s = scores_of(inp, geo, sinks=0, pooling="none").mean(axis=0)
    assert set(st.heads[0].token_index) == set(np.argsort(-s, kind="stable")[:6])


def test_spindle_query_heads_keep_different_tokens():
    geo = Geometry(1, 3, 1, 16, 16)
    rng = np.random.default_rng(0)
    n = 60
    k = rng.standard_normal((n, 1, 16)).astype(np.float32) * 0.05
    for b, tok in enumerate((10, 11, 20, 21, 40)):
        k[tok, 0, :] = 0
        k[tok, 0, b] = 3.0
    inp = LayerInput(
        layer=0, k=k, k_pre=None, v=rng.standard_normal((n, 1, 16)).astype(np.float32),
        positions=np.arange(n, dtype=np.int32),
        q_window=np.zeros((4, 3, 16), np.float32), q_positions=np.arange(n, n + 4, dtype=np.int32),
    )
    hot = {0: [10, 11], 1: [20, 21], 2: [10, 40]}  # head 0 and 2 share token 10
    for j, toks in hot.items():
        inp.q_window[:, j, :] = (k[toks[0], 0] + k[toks[1], 0]) * 3
    pol = policy("spindle-paper", sinks=0, scorer__pooling="none", codebooks="off")
    slots = 5
    st = pol.plan([inp], geo, raw_slot_bytes(geo) * slots)[0]
    hs = st.heads[0]
    assert hs.n_slots == slots
    kept = set(hs.token_index.tolist())
    assert {10, 11, 20, 21, 40} == kept  # the union, each token stored once
    vis = {j: set(hs.token_index[hs.qmask[j]].tolist()) for j in range(3)}
    assert vis[0] != vis[1]
    assert {10, 11} <= vis[0] and {20, 21} <= vis[1] and {10, 40} <= vis[2]
    assert 20 not in vis[0] and 11 not in vis[1]
    # bytes count the union once, not per query head
    assert layer_store_bytes(st, 16, 16) == slots * raw_slot_bytes(geo)


def test_spindle_codebook_layer_fits_its_budget_and_keeps_more(layers):
    target = int(full_cache_bytes(N, GEO.n_layer, 2, 16, 16) * 0.25)
    pol = policy(codebooks__layers=2)
    stores = pol.plan(layers, GEO, target)
    ev = policy(codebooks__layers=0).plan(layers, GEO, target)
    st0 = stores[0]
    assert st0.role in ("codebook", "evict+codebook")
    assert st0.heads[0].n_slots > ev[0].heads[0].n_slots
    for h, hs in enumerate(st0.heads):
        if hs.v_codebook is not None:
            v = layers[0].v[hs.token_index, h]
            rel = np.linalg.norm(hs.v_codebook.reconstruct() - v, axis=1) / np.linalg.norm(v, axis=1)
            assert np.all(rel <= np.sqrt(2 - 2 * pol.stages.codebooks.theta_v) + 1e-5)
        if hs.k_codebook is not None:
            assert hs.k_codebook.index.shape == (hs.n_slots,)
    nbytes = layer_store_bytes(st0, 16, 16)
    k_e = sum(h.k_codebook.n_entries for h in st0.heads) if st0.heads[0].k_codebook else None
    v_e = sum(h.v_codebook.n_entries for h in st0.heads) if st0.heads[0].v_codebook else None
    assert nbytes == codebook_layer_bytes(GEO, st0.heads[0].n_slots, k_e, v_e)


def test_auto_reports_errors(layers):
    target = int(full_cache_bytes(N, GEO.n_layer, 2, 16, 16) * 0.15)
    pol = policy(codebooks__layers="auto")
    stores = pol.plan(layers, GEO, target)
    row = pol.last_report[0]
    assert row["err_evict"] is not None and row["err_evict"] >= 0
    if stores[0].role != "evict":
        assert row["err_codebook"] < row["err_evict"]


def test_make_policy_rejects_unknown():
    with pytest.raises(ValueError, match="spindle"):
        make_policy("h2o")


def test_pyramid_and_allocation():
    w = pyramid_weights(30, 20.0)
    assert abs(w.mean() - 1) < 1e-12 and abs(w[-1] - 1 / 20) < 1e-12 and np.all(np.diff(w) < 0)
    lo = np.full(30, 4)
    hi = np.full(30, 1000)
    s = allocate_slots(w, lo, hi, 9000)
    assert s.sum() == 9000 and np.all(s >= 4) and np.all(s <= 1000) and np.all(np.diff(s) <= 0)
    s = allocate_slots(w, lo, hi, 25000)  # top layers capped, excess goes deeper
    assert s.sum() == 25000 and s[0] == 1000
    with pytest.raises(ValueError):
        allocate_slots(w, lo, hi, 119)


def test_rope_inference_roundtrip():
    rng = np.random.default_rng(3)
    pre = rng.standard_normal((50, 2, 16)).astype(np.float32)
    pos = np.arange(100, 150)
    post = apply_rope(pre, pos)
    rm = infer_rope(pre, post)
    assert rm is not None
    for h in range(2):
        np.testing.assert_allclose(rm.rotate(pre[:, h]), post[:, h], atol=1e-4)
    assert infer_rope(pre, rng.standard_normal(pre.shape).astype(np.float32)) is None


def test_layer_input_validation():
    inp = make_layer(GEO, 0, n=20, w=4)
    inp.v = inp.v[:, :, :8]
    with pytest.raises(ValueError, match="v has shape"):
        make_policy("snapkv").plan([inp], GEO, 10**6)


def test_empty_layer():
    inp = make_layer(GEO, 0, n=0, w=4)
    for name in POLICY_NAMES:
        st = make_policy(name).plan([inp], GEO, 0)[0]
        assert layer_store_bytes(st, 16, 16) == 0


def test_union_masks_option(layers):
    target = int(full_cache_bytes(N, GEO.n_layer, 2, 16, 16) * 0.25)
    own = policy("spindle-paper", codebooks="off").plan(layers, GEO, target)
    uni = policy("spindle-paper", codebooks="off", selector__masks="union").plan(layers, GEO, target)
    differs = False
    for a, b in zip(own, uni):
        for ha, hb in zip(a.heads, b.heads):
            assert np.array_equal(ha.token_index, hb.token_index)  # same union stored
            assert hb.qmask.all()
            differs |= not ha.qmask.all()
    assert differs  # with own masks some query head does not see some slot


def test_threads_do_not_change_the_plan(layers):
    target = int(full_cache_bytes(N, GEO.n_layer, 2, 16, 16) * 0.15)
    a = policy(threads=1).plan(layers, GEO, target)
    b = policy(threads=4).plan(layers, GEO, target)
    for sa, sb in zip(a, b):
        assert sa.role == sb.role
        for ha, hb in zip(sa.heads, sb.heads):
            assert np.array_equal(ha.token_index, hb.token_index)
            assert np.array_equal(ha.qmask, hb.qmask)


def test_codebook_layouts_and_cache():
    from spindle_local.policy.layer_plans import fit_codebook_layer, protect
    from spindle_local.policy.stages import Codebooks, GroupSelect

    inp = make_layer(GEO, 0, n=N, w=8, r=12, seed=4)
    sc = protect(scores_of(inp), inp.positions, 4)
    cfg = (Codebooks(), GroupSelect())
    budget = raw_slot_bytes(GEO) * N // 2
    cache: dict = {}
    best = fit_codebook_layer(inp, GEO, *cfg, sc, budget, 4, cache=cache)
    assert best.store is not None and best.n_slots == max(best.options.values())
    n_cached = len(cache)
    for layout, slots in best.options.items():
        f = fit_codebook_layer(inp, GEO, *cfg, sc, budget, 4, cache=cache, layout=layout)
        assert len(cache) == n_cached  # reused, not rebuilt
        if slots > best.n_slots_raw:
            assert (f.k_codebook, f.v_codebook) == layout and f.n_slots == slots
            assert layer_store_bytes(f.store, 16, 16) == f.bytes <= budget
            hs = f.store.heads[0]
            assert (hs.k_codebook is not None) == layout[0] and (hs.v_codebook is not None) == layout[1]
    fresh = fit_codebook_layer(inp, GEO, *cfg, sc, budget, 4)
    for ha, hb in zip(best.store.heads, fresh.store.heads):
        assert np.array_equal(ha.token_index, hb.token_index)
    # without pre-RoPE keys K stays raw
    inp.k_pre = None
    f = fit_codebook_layer(inp, GEO, *cfg, sc, budget, 4)
    assert f.store is None or all(h.k_raw is not None for h in f.store.heads)


def test_rope_inference_neox_pairing():
    rng = np.random.default_rng(9)
    pre = rng.standard_normal((30, 2, 16)).astype(np.float32)
    # NEOX: rotate (i, i + d/2) pairs: permute dims to adjacent, rotate, permute back
    perm = np.stack([np.arange(8), np.arange(8, 16)], axis=1).reshape(-1)
    post = np.empty_like(pre)
    post[..., perm] = apply_rope(pre[..., perm], np.arange(30))
    rm = infer_rope(pre, post)
    assert rm is not None
    np.testing.assert_allclose(rm.rotate(pre[:, 1]), post[:, 1], atol=1e-4)


def test_recent_keys_enter_the_normaliser():
    inp = make_layer(GEO, 3, n=40, w=4, r=8, seed=5)
    with_recent = scores_of(inp, pooling="none")
    without = scores_of(inp, pooling="none", include_recent=False)
    assert np.all(with_recent <= without + 1e-7)
    np.testing.assert_allclose(without.sum(axis=1), 1.0, rtol=1e-4)  # old tokens are all visible


def test_empty_window_falls_back_to_recency():
    inp = make_layer(GEO, 2, n=50, w=4, seed=6)
    inp.q_window = inp.q_window[:0]
    inp.q_positions = inp.q_positions[:0]
    st = make_policy("snapkv").plan([inp], GEO, raw_slot_bytes(GEO) * 10)[0]
    assert list(st.heads[0].positions) == [0, 1, 2, 3, 44, 45, 46, 47, 48, 49]


def _broad_and_sharp_layers(n: int, seed: int = 11) -> list[LayerInput]:
    """Layer 0: values from 3 prototypes, flat attention; layer 1: attention sharp on token 50."""
    rng = np.random.default_rng(seed)
    w = 8
    pos = np.arange(n + w, dtype=np.int32)

    def layer(idx, redundant, sharp):
        k_pre = rng.standard_normal((n + w, 1, 16)).astype(np.float32)
        k = apply_rope(k_pre, pos)
        if redundant:
            protos = rng.standard_normal((3, 16)).astype(np.float32)
            v = protos[rng.integers(0, 3, n + w)][:, None, :] * rng.uniform(0.5, 2, (n + w, 1, 1)).astype(np.float32)
        else:
            v = rng.standard_normal((n + w, 1, 16)).astype(np.float32)
        q = rng.standard_normal((w, 2, 16)).astype(np.float32) * 0.01
        if sharp:
            q[:, :, :] += k[50, 0] * 3
        return LayerInput(idx, k[:n], k_pre[:n], v[:n], pos[:n], q, pos[n:], k[n:], pos[n:], v[n:])

    return [layer(0, True, False), layer(1, False, True)]


def test_auto_picks_codebook_for_redundant_broad_layer_only():
    """Layer 0: values from 3 prototypes, flat attention -> codebook; layer 1: sharp -> evict."""
    geo = Geometry(n_layer=2, n_head=2, n_head_kv=1, head_dim_k=16, head_dim_v=16)
    n = 200
    layers = _broad_and_sharp_layers(n)
    target = int(full_cache_bytes(n, 2, 1, 16, 16) * 0.25)
    pol = policy(codebooks__max_layers=2, scorer__pooling="none")
    stores = pol.plan(layers, geo, target)
    assert stores[0].role in ("codebook", "evict+codebook")
    assert stores[0].heads[0].n_slots > stores[1].heads[0].n_slots
    assert stores[1].role == "evict"
    assert pol.last_report[0]["err_codebook"] < pol.last_report[0]["err_evict"]
    assert total_bytes(stores, geo) <= target


def test_role_memory_reuses_roles_until_a_layer_doubles(monkeypatch):
    """With a role memory, a later plan of a layer that grew less than twofold keeps the
    decided role without deciding again (same stores as deciding afresh here); once the
    layer holds twice the tokens, the role is decided again."""
    import spindle_local.policy.policies as policies

    geo = Geometry(n_layer=2, n_head=2, n_head_kv=1, head_dim_k=16, head_dim_v=16)
    calls = []
    real = policies.decide_role
    monkeypatch.setattr(policies, "decide_role", lambda *a, **k: calls.append(a[0].n) or real(*a, **k))
    cfg = dict(codebooks__max_layers=2, scorer__pooling="none")
    pol = policy(**cfg)
    pol.role_memory = RoleMemory()
    for n in (200, 300):
        layers = _broad_and_sharp_layers(n)
        target = int(full_cache_bytes(n, 2, 1, 16, 16) * 0.25)
        stores = pol.plan(layers, geo, target)
        fresh = policy(**cfg).plan(layers, geo, target)
        assert [s.role for s in stores] == [s.role for s in fresh]
        assert stores[0].role in ("codebook", "evict+codebook") and stores[1].role == "evict"
        assert total_bytes(stores, geo) <= target
    assert pol.last_report[0].get("role_reused") is True
    # the fresh policies decided on their own; the remembering one decided at 200 only
    assert calls.count(200) == 2 + 2 and calls.count(300) == 2  # two layers each
    pol.plan(_broad_and_sharp_layers(400), geo, int(full_cache_bytes(400, 2, 1, 16, 16) * 0.25))
    assert calls.count(400) >= 1 and not pol.last_report[0].get("role_reused")
    pol.role_memory.clear()
    assert pol.role_memory.get(0, 450) is None


@pytest.mark.parametrize("name,cb_layers", CASES)
def test_unavailable_pairs_are_never_kept(name, cb_layers):
    """Re-planning: a KV head that no longer holds a token must not select it."""
    inp = make_layer(GEO, 0, n=N, w=8, r=12, seed=12)
    rng = np.random.default_rng(12)
    avail = rng.random((N, GEO.n_head_kv)) > 0.3
    avail[:4] = True  # sinks are always held
    avail[:, 0] = True
    inp.available = avail
    inp.k[~avail[:, 1], 1] = 0.0  # placeholders, like the engine's
    inp.v[~avail[:, 1], 1] = 0.0
    inp.k_pre[~avail[:, 1], 1] = 0.0
    layers = [inp] + [make_layer(GEO, layer, n=N, w=8, r=12, seed=12) for layer in range(1, GEO.n_layer)]
    for frac in (0.6, 0.25):
        target = int(full_cache_bytes(N, GEO.n_layer, 2, 16, 16) * frac)
        stores = (policy(name) if cb_layers is None else policy(name, codebooks__layers=cb_layers)).plan(
            layers, GEO, target)
        if name != "full":
            assert total_bytes(stores) <= target
        hs = stores[0].heads[1]
        assert avail[hs.token_index, 1].all()
        if name == "full":
            assert hs.n_slots == avail[:, 1].sum()
        check_store(inp, stores[0])


def test_unavailable_pairs_get_no_attention():
    from spindle_local.policy.scores import window_scores

    inp = make_layer(GEO, 2, n=40, w=4, r=8, seed=13)
    avail = np.ones((40, GEO.n_head_kv), bool)
    avail[10:20, 1] = False
    inp.available = avail
    s = scores_of(inp, pooling="none")
    assert np.all(s[GEO.g : 2 * GEO.g, 10:20] == 0)
    assert np.all(s[:GEO.g, 10:20] > 0)


SPINDLE_VARIANTS = [
    ("spindle-paper", {}),
    ("spindle-paper", dict(codebooks__layers=2)),
    ("spindle", dict(selector__rule="max")),
    ("spindle", dict(selector__rule="mean", selector__masks="union")),
    ("spindle", dict(allocator__floor=0.2)),
    ("spindle", dict(allocator__floor=0.0, selector__rule="max", scorer__value_weight=True)),
    ("spindle", dict(allocator__floor=1.0, codebooks__layers=0)),
    ("spindle", dict(allocator__floor=0.5, allocator__min_slots=40, copy_spans__share=0.25, copy_spans__tokens=30)),
]


@pytest.mark.parametrize("name,opts", SPINDLE_VARIANTS)
@pytest.mark.parametrize("frac", [0.4, 0.25, 0.15])
def test_spindle_variants_respect_budget(layers, name, opts, frac):
    target = int(full_cache_bytes(N, GEO.n_layer, GEO.n_head_kv, 16, 16) * frac)
    pol = policy(name, **opts)
    stores = pol.plan(layers, GEO, target)
    assert total_bytes(stores) <= target
    assert target - total_bytes(stores) < raw_slot_bytes(GEO) * GEO.n_layer + 200 * GEO.n_layer
    for inp, st in zip(layers, stores):
        check_store(inp, st)


def test_mass_min_slots_is_a_floor_up_to_the_flat_share(layers):
    target = int(full_cache_bytes(N, GEO.n_layer, GEO.n_head_kv, 16, 16) * 0.25)

    def planned(**opts):
        pol = policy(codebooks__layers=0, copy_spans="off", **opts)
        pol.plan(layers, GEO, target)
        return np.array([r["slots_planned"] for r in pol.last_report])

    flat = planned(allocator="flat")
    mass = planned(allocator__floor=0.0, allocator__min_slots=0)
    assert (mass != flat).any()  # mass moves slots between layers
    # a minimum at least the flat share gives every layer its flat share back
    assert np.array_equal(planned(allocator__floor=0.0, allocator__min_slots=10_000), flat)
    m = int(flat.min()) // 2
    low = planned(allocator__floor=0.0, allocator__min_slots=m)
    assert (low >= m).all() and low.sum() == flat.sum()
    # capped at three quarters of the flat share, the same minimum leaves a quarter to move
    capped = planned(allocator__floor=0.0, allocator__min_slots=10_000, allocator__min_cap=0.75)
    assert (capped != flat).any() and (capped >= np.floor(0.75 * flat)).all()
    with pytest.raises(ValueError):
        policy(allocator__min_cap=1.5)


def test_anchor_tokens_cap_copy_spans(layers):
    target = int(full_cache_bytes(N, GEO.n_layer, GEO.n_head_kv, 16, 16) * 0.4)
    base = dict(codebooks__layers=0, copy_spans__span=6, copy_spans__share=0.5, copy_spans__from_layer=3,
                copy_spans__min_share=0.0)

    def span_tokens(**opts):
        pol = policy(**base, **opts)
        pol.plan(layers, GEO, target)
        return pol.last_report[-1]["copy_span_tokens"]

    free = span_tokens()
    assert free > 8
    assert 0 < span_tokens(copy_spans__tokens=8) <= 8
    with pytest.raises(ValueError):
        policy(copy_spans__tokens=-1)


def test_mass_slots_contract_and_greedy():
    from spindle_local.policy.budgets import mass_slots

    gains = [np.array([5.0, 4.0, 0.1, 0.1]), np.array([1.0, 1.0, 1.0, 1.0]), np.array([9.0, 0.0])]
    lo = np.array([2, 2, 2])
    hi = np.array([6, 6, 4])
    # no floor: the 4 largest gains are 9, 5, 4 and a 1 (ties: earlier layer first)
    s = mass_slots(gains, lo, hi, np.zeros(3, dtype=np.int64), 6 + 4)
    assert list(s) == [4, 3, 3]
    # a floor is kept even where gains are small
    s = mass_slots(gains, lo, hi, np.array([2, 2, 4]), 6 + 4)
    assert s[2] == 4 and s.sum() == 10 and (s >= lo).all() and (s <= hi).all()
    # everything fits: hi
    assert list(mass_slots(gains, lo, hi, lo, 100)) == list(hi)
    # non-monotone gains are made non-increasing (each layer keeps a prefix)
    s = mass_slots([np.array([0.0, 10.0]), np.array([1.0, 1.0])], np.array([0, 0]), np.array([2, 2]),
                   np.zeros(2, dtype=np.int64), 2)
    assert list(s) == [0, 2]


def test_group_max_and_value_weight():
    from spindle_local.policy.scores import value_norm_weights, window_scores
    from spindle_local.policy.select import group_select

    sc = np.array([[1.0, 0.0, 0.5, 0.0], [0.0, 0.9, 0.0, 0.2]], dtype=np.float32)
    sel, mask = group_select(sc, 2, "max")
    assert list(sel) == [0, 1] and mask.all()
    sel, _ = group_select(sc, 2, "mean")
    assert list(sel) == [0, 1]
    sel, _ = group_select(np.array([[1.0, 0.6, 0.7], [0.0, 0.6, 0.0]]), 1, "mean")
    assert list(sel) == [1]
    inp = make_layer(GEO, 3, n=40, w=8, r=12, seed=3)
    inp.v[5] *= 10.0
    w = value_norm_weights(inp, GEO)
    assert w.shape == (GEO.n_head, 40) and (w[:, 5] > w[:, 6]).all()
    plain = scores_of(inp, pooling="none")
    weighted = scores_of(inp, pooling="none", value_weight=True)
    np.testing.assert_allclose(weighted, plain * w, rtol=1e-6)


class _FreshCopies:
    """A layer source that hands out a new copy on every load and counts the copies alive."""

    def __init__(self, layers):
        import weakref

        self.layers, self.refs, self.most, self.loads = layers, [], 0, 0
        self.ref = weakref.ref

    def __len__(self):
        return len(self.layers)

    def load(self, i):
        from dataclasses import replace

        inp = self.layers[i]
        copy = replace(inp, k=inp.k.copy(), v=inp.v.copy(), k_pre=None if inp.k_pre is None else inp.k_pre.copy())
        self.loads += 1
        self.refs = [r for r in self.refs if r() is not None] + [self.ref(copy)]
        self.most = max(self.most, len(self.refs))
        return copy


@pytest.mark.parametrize("name", [n for n in POLICY_NAMES if n != "full"])
def test_a_plan_holds_one_layer_at_a_time(layers, name):
    # plans stream over layers: with one planning thread no two layers' vectors are alive
    # at once, every layer is installed once, and the plan is the in-memory one
    target = int(full_cache_bytes(N, GEO.n_layer, 2, 16, 16) * 0.25)
    src = _FreshCopies(layers)
    got: dict[int, object] = {}

    def install(i, st):
        assert i not in got
        got[i] = st

    policy(name, threads=1).plan_into(src, GEO, target, install)
    assert src.most == 1 and sorted(got) == list(range(len(layers)))
    assert src.loads >= 2 * len(layers)  # scored, then reloaded to build each store
    ref = policy(name, threads=1).plan(layers, GEO, target)
    for i, st in enumerate(ref):
        assert got[i].role == st.role
        for ha, hb in zip(got[i].heads, st.heads):
            assert np.array_equal(ha.token_index, hb.token_index)


def test_eviction_layers_are_installed_smallest_first(layers):
    # the runtime allocates a layer's new store beside its old one: the largest comes last,
    # when every other layer's scores are dropped (and the order changes no store)
    target = int(full_cache_bytes(N, GEO.n_layer, 2, 16, 16) * 0.25)
    def slots(st):
        return max(len(h.token_index) for h in st.heads)

    order: list[tuple[int, int]] = []
    pol = policy("pyramidkv", threads=1)
    pol.plan_into(_FreshCopies(layers), GEO, target,
                  lambda i, st: order.append((i, slots(st))) if st.role == "evict" else None)
    sizes = [n for _, n in order]
    assert sizes == sorted(sizes) and len(set(sizes)) > 1
    ref = policy("pyramidkv", threads=1).plan(layers, GEO, target)
    assert [n for _, n in sorted(order)] == [slots(st) for st in ref if st.role == "evict"]


@pytest.mark.parametrize("native_threads,on_cpu,cpus,expected", [
    (2, True, 2, 1),    # the runtime's threads take every core: planning runs inline
    (1, True, 2, 2),    # one core left: one thread scores in numpy while the runtime scores the next layer
    (16, True, 16, 1),
    (4, True, 16, 13),
    (99, True, 4, 1),   # more runtime threads than cores: still one
    (16, False, 16, 16),  # layers on a GPU or an RPC server: the CPU is planning's
])
def test_planning_threads_leave_the_runtime_its_cores(native_threads: int, on_cpu: bool, cpus: int,
                                                      expected: int) -> None:
    assert planning_threads(native_threads, native_on_cpu=on_cpu, cpus=cpus) == expected
