"""Compression where the KV lives: window-query capture, scores and the store gather in the patch.

Oracles: the numpy reference of the window scores (``policy/scores.py``, plain-numpy
kernels) on the same layer read to the host; the rows llama.cpp held before a plan
(a gathered store must hold exactly those f16 rows); and the full cache (a store
gathered from every old token gives the full cache's logits).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spindle_local.policy import inputs as pin
from spindle_local.policy.scores import raw_window_scores
from spindle_local.policy.stages import WindowScorer
from spindle_local.runtime import native
from spindle_local.runtime.config import EngineConfig
from spindle_local.runtime.engine import Engine
from spindle_local.runtime.lowlevel import LlamaModel
from spindle_local.runtime.plan_source import PlanSource, assemble_scored_input
from spindle_local.testing.tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.model  # every test here loads a model (or the patched library)

TINY = {
    "mha": dict(n_layer=2, n_embd=64, n_head=4, n_head_kv=4, head_dim=16, seed=21),
    "gqa": dict(n_layer=3, n_embd=96, n_head=6, n_head_kv=2, head_dim=32, seed=22),
}


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = Path(tmp_path_factory.mktemp("tiny-backend"))
    return {name: write_tiny_llama(d / f"{name}.gguf", **cfg).path for name, cfg in TINY.items()}


def _tokens(model: LlamaModel, n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, model.n_vocab, n)]


def _engine(path: Path, **kw) -> Engine:
    cfg = EngineConfig(**{"policy": "spindle", "kv_budget": 0.25, "n_cells": 512, "recent": 64, "chunk": 128,
                          "n_threads": 2, "flash_attn": False, **kw})
    return Engine(path, cfg)


def _compare_scores(eng: Engine, cut: int) -> None:
    """Patch scores of every layer the store serves equal the numpy reference on the host-read layer."""
    plain, weighted = WindowScorer(pooling="none"), WindowScorer(pooling="none", value_weight=True)
    scale = 1 / np.sqrt(eng.pgeo.head_dim_k)
    for il in eng.store_layer_ids:
        ref_inp = eng.host_layer_input(il, cut)
        ref = raw_window_scores(ref_inp, eng.pgeo, plain, scale=scale, use_numba=False)
        ref_vw = raw_window_scores(ref_inp, eng.pgeo, weighted, scale=scale, use_numba=False)
        q, q_pos = eng.window(il)
        meta = eng._store_meta.get(il, (np.zeros(eng.pgeo.n_head_kv, np.int32),
                                        np.zeros((eng.pgeo.n_head_kv, 0), np.int32)))
        sc = native.layer_scores(eng.ctx, il, q, q_pos, scale, meta[1].shape[1], eng.cells)
        got = assemble_scored_input(il, sc, meta[0], meta[1], cut, eng.pgeo.g, q, q_pos)
        assert np.array_equal(got.positions, ref_inp.positions)
        assert np.array_equal(got.available, np.asarray(ref_inp.available, bool))
        # f16 rounding of the queries in ggml's f16 products: ~1e-3 of a score of at most 1
        np.testing.assert_allclose(got.attn, ref, rtol=2e-2, atol=2e-3)
        vn = np.linalg.norm(ref_inp.v, axis=2)
        ok = got.available
        np.testing.assert_allclose(got.v_norm[ok], vn[ok], rtol=2e-3, atol=1e-4)
        got_vw = raw_window_scores(got, eng.pgeo, weighted, scale=scale)
        np.testing.assert_allclose(got_vw, ref_vw, rtol=3e-2, atol=3e-3)


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("flash_attn", [False, True])
def test_patch_scores_match_numpy_reference_tiny(tiny_paths: dict[str, Path], name: str, flash_attn: bool) -> None:
    eng = _engine(tiny_paths[name], flash_attn=flash_attn, stages={"codebooks": "on", "codebooks.layers": 1})
    try:
        toks = _tokens(eng.model, 700)
        eng.feed(toks[:400])  # fits: no plan yet, the window queries are the prompt's last tokens
        _compare_scores(eng, cut=eng.n_past - 64)
        eng.feed(toks[400:])  # plans: raw and codebook layers in the store
        assert eng.stats.compressions >= 1 and eng._store_layers
        _compare_scores(eng, cut=eng.n_past - 64)
    finally:
        eng.close()


def test_patch_scores_match_numpy_reference_smollm2(default_model: Path, pydoc_tokens: list[int]) -> None:
    eng = _engine(default_model, n_cells=1024, recent=256, chunk=256)
    try:
        eng.feed(pydoc_tokens[:1500])
        assert eng.stats.compressions >= 1
        _compare_scores(eng, cut=eng.n_past - 256)
    finally:
        eng.close()


def test_patch_scores_with_slots_newer_than_the_queries(tiny_paths: dict[str, Path]) -> None:
    """Queries placed before some of the store's slots see those slots masked per KV head (the
    score graph's per-head mask; with every slot older than the queries one mask serves all
    heads): the patch's scores equal the numpy reference for either placement."""
    eng = _engine(tiny_paths["gqa"])
    try:
        eng.feed(_tokens(eng.model, 700))
        assert eng._store_layers
        cut = eng.n_past - 64
        scale = 1 / np.sqrt(eng.pgeo.head_dim_k)
        plain = WindowScorer(pooling="none")
        checked = 0
        for il in eng.store_layer_ids:
            n_slot_head, slot_pos = eng._store_meta[il]
            q, q_pos = eng.window(il)
            middle = int(np.median(slot_pos[0, :n_slot_head[0]]))
            for shift in (0, int(q_pos.min()) - middle):  # after every slot; among them
                qp = (q_pos - shift).astype(np.int32)
                ref_inp = eng.host_layer_input(il, cut)
                ref_inp.q_positions = qp
                ref = raw_window_scores(ref_inp, eng.pgeo, plain, scale=scale, use_numba=False)
                sc = native.layer_scores(eng.ctx, il, q, qp, scale, slot_pos.shape[1], eng.cells)
                got = assemble_scored_input(il, sc, n_slot_head, slot_pos, cut, eng.pgeo.g, q, qp)
                assert np.array_equal(got.positions, ref_inp.positions)
                np.testing.assert_allclose(got.attn, ref, rtol=2e-2, atol=2e-3)
                if shift:
                    # some of head 0's slots are newer than the first query: the per-head mask is used
                    assert (slot_pos[0, :n_slot_head[0]] > qp.min()).any()
                checked += 1
        assert checked == 2 * len(eng.store_layer_ids)
    finally:
        eng.close()


def test_scores_cover_the_cells_in_use(tiny_paths: dict[str, Path]) -> None:
    """After a plan the sequence holds fewer cells than are allocated, at the front: the patch
    scores those (every one the window sees gets attention) and reports the rest as unused,
    with attention and value norm 0."""
    eng = _engine(tiny_paths["gqa"])
    try:
        eng.feed(_tokens(eng.model, 700))
        assert eng.stats.compressions >= 1
        scale = 1 / np.sqrt(eng.pgeo.head_dim_k)
        for il in eng.store_layer_ids:
            n_slot_head, slot_pos = eng._store_meta[il]
            q, q_pos = eng.window(il)
            sc = native.layer_scores(eng.ctx, il, q, q_pos, scale, slot_pos.shape[1], eng.cells)
            used = sc.cell_pos >= 0
            n_used = int(used.sum())
            assert 0 < n_used < eng.cells - 16
            assert used[:n_used].all() and not used[n_used:].any()  # compacted to the front
            seen = used & (sc.cell_pos <= q_pos.min())
            assert (sc.cell_attn[:, seen] > 0).all()
            assert (sc.cell_vnorm[:, used] > 0).all()
            assert not sc.cell_attn[:, ~used].any() and not sc.cell_vnorm[:, ~used].any()
    finally:
        eng.close()


def test_capture_reads_the_graphs_queries(tiny_paths: dict[str, Path]) -> None:
    """The captured rows are the last ``window`` queries of the ubatch, post-RoPE, every layer."""
    from spindle_local.testing.reference import ReferenceModel

    path = tiny_paths["gqa"]
    eng = _engine(path)
    try:
        toks = _tokens(eng.model, 100, seed=3)
        eng.feed(toks)
        ref = ReferenceModel.load(path)
        q_all = ref.forward(np.asarray(toks)).q
        w = eng.config.window
        assert list(eng.queries.positions) == list(range(100 - w, 100))
        for il in range(eng.geometry.n_layer):
            np.testing.assert_allclose(eng.queries.layer(il), q_all[il][-w:], rtol=1e-3, atol=2e-3)
    finally:
        eng.close()


def _record_cache_rows(eng: Engine) -> dict[int, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Every (layer, position)'s cached K/V rows, recorded before each plan of ``eng``."""
    rows: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    compress = eng._compress

    def recording(**kw):
        for il in range(eng.geometry.n_layer):
            k, v, pos = eng.ctx.read_layer_kv(il)
            for j, p in enumerate(pos):
                rows.setdefault(il, {})[int(p)] = (k[j], v[j])
        compress(**kw)

    eng._compress = recording
    return rows


def _assert_store_rows(eng: Engine, rows, layers, more_than: int = 0) -> None:
    """Every raw slot of ``layers`` holds exactly the f16 row the cache held at its position."""
    for il in layers:
        st = eng.ctx.store_get(il)
        assert st.heads and all(h.k_raw is not None for h in st.heads)
        for h, hs in enumerate(st.heads):
            assert len(hs.positions) > more_than
            for s, p in enumerate(hs.positions):
                k, v = rows[il][int(p)]
                assert np.array_equal(hs.k_raw[s], k[h]) and np.array_equal(hs.v_raw[s], v[h])


@pytest.mark.parametrize("flash_attn", [False, True])
def test_gathered_store_holds_the_cached_rows(tiny_paths: dict[str, Path], flash_attn: bool) -> None:
    """After plans, every raw slot of a gathered layer holds exactly the f16 row llama.cpp cached."""
    eng = _engine(tiny_paths["gqa"], flash_attn=flash_attn, policy="snapkv")
    try:
        toks = _tokens(eng.model, 1200, seed=4)
        rows = _record_cache_rows(eng)
        for done in range(0, len(toks), 128):
            eng.feed(toks[done:done + 128])
        assert eng.stats.compressions >= 2  # the later plans gather from the store too
        _assert_store_rows(eng, rows, range(eng.geometry.n_layer))
    finally:
        eng.close()


@pytest.mark.parametrize("flash_attn", [True, False])
def test_gather_in_several_chunks_holds_the_cached_rows(default_model: Path, pydoc_tokens: list[int],
                                                        flash_attn: bool) -> None:
    """A layer keeping more slots than one gather chunk holds (SmolLM2: 1 MiB of F32 rows,
    1,365 slots) is written chunk by chunk into views of its K and (transposed) V: every
    slot still holds exactly the f16 row llama.cpp cached."""
    eng = Engine(default_model, EngineConfig(policy="snapkv", kv_budget=0.9, n_threads=2, flash_attn=flash_attn))
    try:
        rows = _record_cache_rows(eng)
        eng.feed(pydoc_tokens[:2600])
        assert eng.stats.compressions >= 2  # the second plan gathers from the store too
        chunk = (1 << 20) // (max(eng.pgeo.head_dim_k, eng.pgeo.head_dim_v) * eng.pgeo.n_head_kv * 4)
        big = [il for il in range(eng.geometry.n_layer) if eng._store_meta[il][1].shape[1] > chunk]
        assert big  # the case under test: layers gathered in more than one chunk
        _assert_store_rows(eng, rows, big, more_than=chunk)
    finally:
        eng.close()


def test_gather_of_every_token_keeps_the_logits(tiny_paths: dict[str, Path]) -> None:
    """A store gathered from every old cell attends like the full cache (split and joined paths)."""
    path = tiny_paths["gqa"]
    eng = _engine(path, policy="full")
    ref = _engine(path, policy="full")
    try:
        toks = _tokens(eng.model, 300, seed=5)
        eng.feed(toks[:200])
        ref.feed(toks[:200])
        native.capture(eng.ctx, 0)  # the gather needs the store's configuration only
        g = eng.pgeo.g
        for il in range(eng.geometry.n_layer):
            sc = native.layer_scores(eng.ctx, il, np.zeros((1, eng.pgeo.n_head, eng.pgeo.head_dim_k), np.float32),
                                     np.array([10_000], np.int32), 0.1, 0, eng.cells)
            cells = np.nonzero((sc.cell_pos >= 0) & (sc.cell_pos < 150))[0]
            cells = cells[np.argsort(sc.cell_pos[cells])]
            hkv = eng.pgeo.n_head_kv
            native.store_gather(eng.ctx, il, np.full(hkv, len(cells), np.int32),
                                np.tile(cells.astype(np.int32), (hkv, 1)), np.ones((hkv * g, len(cells)), np.uint8))
        eng.ctx.seq_rm(0, 150)
        eng.ctx.compact()
        eng._store_layers = set(range(eng.geometry.n_layer))
        a = eng.feed(toks[200:260])  # joined path (a prompt chunk)
        b = ref.feed(toks[200:260])
        np.testing.assert_allclose(a, b, atol=2e-3)
        a = eng.step(toks[260])  # split path (one token)
        b = ref.step(toks[260])
        np.testing.assert_allclose(a, b, atol=2e-3)
    finally:
        eng.close()
        ref.close()


@pytest.mark.parametrize("policy,options,host_layers", [
    ("snapkv", {}, 0), ("pyramidkv", {}, 0), ("streaming", {}, 0),
    ("spindle", {}, 0), ("spindle", {"stages": {"codebooks": "on"}}, None),
])
def test_plans_read_no_eviction_layer_to_the_host(default_model: Path, pydoc_tokens: list[int], monkeypatch,
                                                  policy: str, options: dict, host_layers: int | None) -> None:
    """Count the rows the read hooks deliver during plans: only codebook candidates are read."""
    read: list[int] = []
    real_read, real_get = native.read_layer_kv, native.store_get

    def counting_read(ctx, layer, seq=0):
        read.append(layer)
        return real_read(ctx, layer, seq)

    def counting_get(ctx, layer):
        read.append(layer)
        return real_get(ctx, layer)

    monkeypatch.setattr(native, "read_layer_kv", counting_read)
    monkeypatch.setattr(native, "store_get", counting_get)
    eng = _engine(default_model, policy=policy, n_cells=768, recent=256, chunk=256, **options)
    try:
        eng.feed(pydoc_tokens[:1800])
        assert eng.stats.compressions >= 2
        limit = eng.policy.codebook_candidates(eng.geometry.n_layer) if host_layers is None else host_layers
        assert all(il < limit for il in read), sorted(set(read))
        if host_layers == 0:
            assert read == []
        assert eng.refresh_stats().reserve_ratio <= 0.25 + 1e-9
    finally:
        eng.close()


def test_plan_source_scores_once_per_layer(default_model: Path, pydoc_tokens: list[int], monkeypatch) -> None:
    """Each scored layer is computed once per plan however often the policy loads it."""
    calls: list[int] = []
    real = native.layer_scores

    def counting(ctx, layer, *a, **kw):
        calls.append(layer)
        return real(ctx, layer, *a, **kw)

    monkeypatch.setattr(native, "layer_scores", counting)
    eng = _engine(default_model, policy="snapkv", n_cells=768, recent=256, chunk=256)
    try:
        eng.feed(pydoc_tokens[:1000])
        n = eng.stats.compressions
        assert n >= 1
        assert sorted(calls) == sorted(list(range(eng.geometry.n_layer)) * n)
    finally:
        eng.close()


def test_plan_source_counts_host_bytes(default_model: Path, pydoc_tokens: list[int]) -> None:
    eng = _engine(default_model, n_cells=768, recent=256, chunk=256, stages={"codebooks": "on"})
    try:
        eng.feed(pydoc_tokens[:600])
        src = PlanSource(eng, cut=eng.n_past - 256, lookahead=None)
        src.load(0)
        assert src.host_bytes_read > 0  # layer 0 is a codebook candidate: read to the host
        before = src.host_bytes_read
        src.load(eng.geometry.n_layer - 1)
        assert src.host_bytes_read == before  # a deep layer is scored in the patch
    finally:
        eng.close()


_NUMBA_PROBE = """
import json, sys
from spindle_local.runtime.config import EngineConfig
from spindle_local.runtime.engine import Engine
model, tokens, policy, stages = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3], json.loads(sys.argv[4])
cfg = EngineConfig(policy=policy, kv_budget=0.25, n_cells=768, recent=256, chunk=256, n_threads=2,
                   flash_attn=False, stages=stages)
eng = Engine(model, cfg)
eng.feed(tokens)
print(json.dumps({"compressions": eng.stats.compressions, "numba": "numba" in sys.modules}))
eng.close()
"""


@pytest.mark.parametrize("policy,stages,loads", [
    ("snapkv", {}, False), ("spindle", {}, False), ("spindle", {"codebooks": "on"}, True),
])
def test_eviction_plans_do_not_load_numba(default_model: Path, pydoc_tokens: list[int], tmp_path: Path,
                                          policy: str, stages: dict, loads: bool) -> None:
    """numba and its kernels cost 110-130 MiB of the process; only layers read to the host
    (codebook candidates) need them, so plans whose layers are all scored in the patch run
    without importing it (a fresh interpreter: this one has loaded numba already)."""
    import json
    import subprocess
    import sys

    toks = tmp_path / "tokens.json"
    toks.write_text(json.dumps(pydoc_tokens[:1800]))
    out = subprocess.run([sys.executable, "-c", _NUMBA_PROBE, str(default_model), str(toks), policy,
                          json.dumps(stages)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["compressions"] >= 2
    assert got["numba"] is loads


def test_compression_graphs_share_one_allocation_freed_after_each_plan(default_model: Path,
                                                                       pydoc_tokens: list[int]) -> None:
    """The score graphs of all layers reuse one allocation (grown to the largest), which the
    engine frees when a compression is done: nothing stays allocated between plans."""
    eng = _engine(default_model, n_cells=1024, recent=256, chunk=256, window=48)
    try:
        eng.feed(pydoc_tokens[:1500])
        assert eng.stats.compressions >= 1
        assert native.scratch_free(eng.ctx) == 0  # the engine freed it after its last plan
        _compare_scores(eng, cut=eng.n_past - 256)  # queries in two chunks, summed: as the reference
        native.scratch_free(eng.ctx)
        q, q_pos = eng.window(eng.store_layer_ids[0])
        assert len(q_pos) > 32  # more than one chunk of queries (the scores are summed over chunks)
        sizes = []
        for il in eng.store_layer_ids[:3]:
            meta = eng._store_meta[il]
            native.layer_scores(eng.ctx, il, *eng.window(il), 0.125, meta[1].shape[1], eng.cells)
            sizes.append(native.scratch_free(eng.ctx))
        assert all(s > 0 for s in sizes)
        for il in eng.store_layer_ids[:3]:  # kept: the second and third layers allocate nothing new
            meta = eng._store_meta[il]
            native.layer_scores(eng.ctx, il, *eng.window(il), 0.125, meta[1].shape[1], eng.cells)
        assert native.scratch_free(eng.ctx) == max(sizes)
        assert native.scratch_free(eng.ctx) == 0
    finally:
        eng.close()


def _valid_slot_norms(eng: Engine, il: int) -> tuple[np.ndarray, np.ndarray]:
    """(the engine's carried value norms, the patch's from the store's rows), valid slots only."""
    nsh, pos = eng._store_meta[il]
    q, q_pos = eng.window(il)
    sc = native.layer_scores(eng.ctx, il, q, q_pos, eng.attn_scale(il), pos.shape[1], eng.cells)
    valid = np.arange(pos.shape[1])[None, :] < nsh[:, None]
    return eng._slot_vnorm[il][valid], sc.slot_vnorm[valid]


@pytest.mark.parametrize("name", list(TINY))
def test_slot_value_norms_carried_from_plan_to_plan(tiny_paths: dict[str, Path], name: str) -> None:
    """A gathered store's value norms come from the plan that gathered it (no store V row is read
    again): equal to the patch's norms of the store's rows, and the plans equal those of an
    engine that recomputes them."""

    class Forgetful(dict):  # an engine that never keeps them: every plan computes them in the patch
        def __setitem__(self, key, value) -> None:
            pass

    toks = _tokens(LlamaModel(tiny_paths[name]), 900, seed=3)
    a, b = _engine(tiny_paths[name]), _engine(tiny_paths[name])
    b._slot_vnorm = Forgetful()
    try:
        la, lb = a.feed(toks), b.feed(toks)
        assert a.stats.compressions >= 3 and a.stats.compressions == b.stats.compressions
        assert set(a._slot_vnorm) == a._store_layers and not b._slot_vnorm
        for il in a._store_layers:
            carried, patch = _valid_slot_norms(a, il)
            np.testing.assert_allclose(carried, patch, rtol=1e-6, atol=0)  # equal to the bit on the CPU
            assert np.array_equal(a._store_meta[il][1], b._store_meta[il][1])
        np.testing.assert_array_equal(la, lb)
        # an uploaded store (a restored session) has none until a plan gathers it again
        a.load_state_dict(*a.state_dict())
        assert not a._slot_vnorm
        a.feed(_tokens(a.model, 300, seed=4))
        assert set(a._slot_vnorm) == a._store_layers
        for il in a._store_layers:
            np.testing.assert_allclose(*_valid_slot_norms(a, il), rtol=1e-6, atol=0)
    finally:
        a.close()
        b.close()


def test_planning_beside_the_runtime_leaves_it_its_cores(tiny_paths: dict[str, Path]) -> None:
    """On the CPU, the passes that call the runtime plan on the cores its threads leave;
    codebook fits (no runtime calls) keep every core."""
    from spindle_local.policy.parallel import planning_threads

    for threads in (1, 2):
        eng = _engine(tiny_paths["gqa"], n_threads=threads, gpu_layers=0)  # every layer on the CPU
        try:
            ctx = eng.policy.context
            assert ctx.beside_runtime == planning_threads(threads, native_on_cpu=True) >= 1
            assert ctx.threads is None and ctx.runtime_pass_threads() == ctx.beside_runtime
        finally:
            eng.close()


def test_slot_counts_add_up_to_the_tokens_evicted(tiny_paths: dict[str, Path]) -> None:
    """With the evicted-mass stage, from plan to plan the slots of each KV head of a weighed
    layer stand for every token that has left the regular cache; the counts survive a saved
    and restored state."""
    eng = _engine(tiny_paths["gqa"], stages={"mass": "on", "mass.from_layer": 1, "mass.share": 1.0})
    try:
        eng.feed(_tokens(eng.model, 900, seed=5))
        assert eng.stats.compressions >= 3
        left = eng.n_past - eng.ctx.kv_used()
        assert set(eng._slot_count) == {il for il in eng._store_layers if il >= 1} != set()
        for il, count in eng._slot_count.items():
            nsh = eng._store_meta[il][0]
            for h in range(len(nsh)):
                assert int(count[h, :nsh[h]].sum(dtype=np.int64)) == left
        before = {il: c.copy() for il, c in eng._slot_count.items()}
        eng.load_state_dict(*eng.state_dict())
        assert set(eng._slot_count) == set(before)
        for il, c in before.items():
            assert np.array_equal(eng._slot_count[il], c)
    finally:
        eng.close()
