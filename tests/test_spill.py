"""The prompt spill (runtime/spill.py): rows evicted while a long prompt is read are
candidates again for the prompt's last plan, then the host copy is dropped."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spindle_local.eval.texts import pydoc_text
from spindle_local.runtime.engine import Engine, EngineConfig
from spindle_local.runtime.spill import PromptSpill


def test_spill_keeps_rows_in_order_and_stops_when_closed() -> None:
    sp = PromptSpill()
    k = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    assert sp.rows(0) is None
    sp.add(0, k, k + 1, np.arange(4))
    sp.add(0, k[:2] * 2, k[:2], np.array([7, 9]))
    before = sp.rows(0)
    assert np.array_equal(before[2], [0, 1, 2, 3, 7, 9]) and before[0].dtype == np.float16
    sp.closed = True
    sp.add(0, k, k, np.array([20, 21, 22, 23]))
    assert np.array_equal(sp.rows(0)[2], [0, 1, 2, 3, 7, 9])  # closed: nothing new recorded
    assert np.array_equal(sp.rows(0)[0][4:], (k[:2] * 2).astype(np.float16))
    assert sp.nbytes() == 6 * (2 * 6 * 2 + 4)


def _plans(default_model: Path, tokens: list[int], spill: bool, model=None):
    """Feed ``tokens`` through a 600-cell cache; per plan: (cut, {layer: [positions per KV head]})."""
    cfg = EngineConfig(policy="spindle", kv_budget=0.25, n_cells=600, n_threads=2, spill=spill)
    eng = Engine(default_model, cfg, model=model)
    plans = []
    orig = eng._compress

    def record(**kw):
        cut = eng.n_past - max(eng._recent(), kw.get("keep", 0))
        orig(**kw)
        plans.append((cut, {il: [h.positions.copy() for h in eng.ctx.store_get(il).heads]
                            for il in (5, 25)}))

    eng._compress = record
    eng.feed(tokens)
    return eng, plans


def test_the_last_plan_can_bring_back_what_earlier_ones_evicted(default_model: Path) -> None:
    from spindle_local.runtime.lowlevel import LlamaModel

    model = LlamaModel(str(default_model))
    tokens = model.tokenize(pydoc_text()[:9_000], add_special=True)[:1500]
    back = {}
    for spill in (True, False):
        eng, plans = _plans(default_model, tokens, spill, model=model)
        try:
            assert len(plans) >= 3
            assert eng._spill is None  # dropped when feed() returns
            assert eng.refresh_stats().reserve_ratio <= 0.25 + 1e-9
            n = 0
            for il in (5, 25):
                for h in range(len(plans[-1][1][il])):
                    evicted: set[int] = set()
                    for cut, stores in plans[:-1]:
                        evicted |= set(range(cut)) - set(stores[il][h].tolist())
                    n += len(evicted & set(plans[-1][1][il][h].tolist()))
            back[spill] = n
            if spill:
                # every row that left the regular cache before the last plan, once, in f16 + position
                g = eng.geometry
                per_token = eng.bytes_per_token + 4 * g.n_layer
                assert eng.stats.peak_spill_bytes == plans[-2][0] * per_token
            else:
                assert eng.stats.peak_spill_bytes == 0
        finally:
            eng.ctx.close()
    model.close()
    assert back[False] == 0  # without the spill an evicted token is gone for good
    assert back[True] > 0, back
