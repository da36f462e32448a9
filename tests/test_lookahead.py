"""The look-ahead probe: mid-prompt plans score with the queries of the prompt's end.

The probe decodes the prompt's last ``window`` tokens right after what has been read,
keeps their queries (turned to their final positions) and takes them back out. These
tests hold it to two promises: it leaves no trace in the engine's state, and its
queries are the real ones wherever the real ones do not depend on the unread middle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spindle_local.eval.texts import pydoc_text
from spindle_local.runtime.engine import Engine, EngineConfig

pytestmark = pytest.mark.model  # every test here loads a model (or the patched library)


@pytest.fixture(scope="module")
def text_tokens(default_model: Path) -> list[int]:
    from spindle_local.runtime.lowlevel import LlamaModel

    with LlamaModel(default_model) as m:
        return m.tokenize(pydoc_text()[:12_000], add_special=True)


def _engine(model_path: Path, model=None) -> Engine:
    # Room for 2,048 tokens: nothing in these tests triggers a compression by itself.
    cfg = EngineConfig(policy="spindle", kv_budget=0.25, n_cells=2048, max_tokens=2048, n_threads=2)
    return Engine(model_path, cfg, model=model)


def test_probe_leaves_no_trace(default_model: Path, text_tokens: list[int]) -> None:
    """After a probe the cache, tokens, window queries and next logits are as if it never ran."""
    a = _engine(default_model)
    b = _engine(default_model, model=a.model)
    try:
        head, more, tail = text_tokens[:600], text_tokens[600:800], text_tokens[1200:1232]
        a.feed(head)
        b.feed(head)
        pos_before, q_before = a.queries.snapshot()
        range_before, used_before = a.ctx.pos_range(), a.regular_count()
        positions, rows = a._probe(tail, 1200)
        assert list(positions) == list(range(1200, 1232))
        assert len(rows) == a.geometry.n_layer and rows[0].shape == (32, a.pgeo.n_head, a.pgeo.head_dim_k)
        assert a.ctx.pos_range() == range_before and a.regular_count() == used_before
        assert a.n_past == 600 and a.tokens == b.tokens
        pos_after, q_after = a.queries.snapshot()
        assert np.array_equal(pos_before, pos_after)
        assert all(np.array_equal(x, y) for x, y in zip(q_before, q_after))
        la, lb = a.feed(more), b.feed(more)
        np.testing.assert_allclose(la, lb, rtol=0, atol=1e-4)
    finally:
        b.ctx.close()
        a.close()


def test_probe_queries_are_the_real_ones_in_layer_0(default_model: Path, text_tokens: list[int]) -> None:
    """Layer 0's queries depend only on the token and its position, so the probe's queries,
    rotated to the final positions, must equal those the real pass computes there; deeper
    layers see the context, which the probe lacks, and must differ."""
    n, w = 1500, 32
    a = _engine(default_model)
    b = _engine(default_model, model=a.model)
    try:
        a.feed(text_tokens[:n])  # the real pass: window queries of positions n-w .. n-1
        assert list(a.queries.positions) == list(range(n - w, n))
        b.feed(text_tokens[:500])
        positions, rows = b._probe(text_tokens[n - w:n], n - w)
        assert list(positions) == list(range(n - w, n))
        real0 = a.queries.layer(0)
        scale = float(np.abs(real0).max())
        assert np.abs(rows[0] - real0).max() <= 2e-3 * scale
        deep = a.geometry.n_layer - 1
        assert np.abs(rows[deep] - a.queries.layer(deep)).max() > 1e-2 * float(np.abs(a.queries.layer(deep)).max())
    finally:
        b.ctx.close()
        a.close()


def _needle_slots(eng: Engine, start: int, n: int = 20) -> int:
    """(layer, KV head, token) slots of the store that hold one of the needle's first ``n`` tokens."""
    needle = set(range(start, start + n))
    return sum(len(needle.intersection(h.positions.tolist()))
               for il in range(eng.geometry.n_layer) for h in eng.ctx.store_get(il).heads)


@pytest.mark.parametrize("depth", [0.15, 0.4])
def test_lookahead_keeps_the_needle_through_mid_prompt_plans(default_model: Path, depth: float) -> None:
    """A 2,000-token pass-key prompt read through an 800-cell regular cache is compressed
    three or four times before its question arrives. With the look-ahead probe those plans
    already score with the question: the key is found (as by the full cache), and the
    store holds far more of the needle's slots than when the plans only see the text
    read so far (measured 261 vs 56 and 318 vs 139; without the probe both keys are lost)."""
    from spindle_local.eval.needle import NeedleBuilder, key_found, random_key
    from spindle_local.eval.runner import greedy_answer

    full = Engine(default_model, EngineConfig(policy="full", n_cells=2100, max_tokens=2100, n_threads=2))
    try:
        builder = NeedleBuilder(lambda t: full.model.tokenize(t, add_special=False), full.model.token_to_piece,
                                pydoc_text())
        rng = np.random.default_rng(3)
        keys = [random_key(rng) for _ in range(2)]
        p = builder.build(2000, depth, keys[[0.15, 0.4].index(depth)])
        assert key_found(greedy_answer(full, p.tokens), p.key)
        found, held, plans, probes = {}, {}, {}, {}
        for look, reuse in ((True, False), (False, False), ("reuse", True)):
            # the mid-prompt plans alone decide what reaches the end; without salient runs,
            # which keep the key whatever the window (tests/test_question_later.py)
            cfg = EngineConfig(policy="spindle", kv_budget=0.25, n_cells=800, n_threads=2, lookahead=bool(look),
                               lookahead_reuse=reuse, stages={"salient": "off"})
            eng = Engine(default_model, cfg, model=full.model)  # the model is shared: closed with `full`
            try:
                found[look] = key_found(greedy_answer(eng, p.tokens), p.key)
                held[look] = _needle_slots(eng, p.needle_start)
                plans[look], probes[look] = eng.stats.compressions, eng.stats.probes
                # a probe runs for its plan: its time counts as compression, not reading
                s = eng.stats
                assert (s.probe_seconds > 0) == bool(look) and s.compress_seconds > s.probe_seconds
                assert eng.refresh_stats().reserve_ratio <= 0.25 + 1e-9
            finally:
                eng.ctx.close()
        # one probe per mid-prompt plan; reused, one until the tokens read have doubled
        assert probes[False] == 0 and 2 <= probes[True] < plans[True] and 1 <= probes["reuse"] < probes[True], probes
        assert found["reuse"], "a reused probe still asks the question"
        assert plans[True] >= 3 and plans[False] >= 3
        assert found[True], "the look-ahead probe should keep the pass key through the mid-prompt plans"
        assert held[True] > 1.5 * held[False], held
    finally:
        full.close()
