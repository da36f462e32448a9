"""Lazy mid-prompt plans: a plan made while a prompt is read moves only the oldest tokens
the rest of the prompt needs room for, so the tokens still to read see the others exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spindle_local.eval.kld import compare_logits
from spindle_local.eval.texts import pydoc_text
from spindle_local.runtime.engine import Engine, EngineConfig

pytestmark = pytest.mark.model  # every test here loads a model (or the patched library)

CELLS, N = 600, 900


@pytest.fixture(scope="module")
def runs(default_model: Path):
    from spindle_local.runtime.lowlevel import LlamaModel

    model = LlamaModel(str(default_model))
    tokens = model.tokenize(pydoc_text()[:8_000], add_special=True)[:N]
    out = {}
    for name, cfg in {
        "full": EngineConfig(policy="full", n_cells=1024, n_threads=2),
        "lazy": EngineConfig(policy="spindle", kv_budget=0.25, n_cells=CELLS, n_threads=2),
        "eager": EngineConfig(policy="spindle", kv_budget=0.25, n_cells=CELLS, n_threads=2, lazy_plans=False),
    }.items():
        eng = Engine(default_model, cfg, model=model)
        plans = []  # (n_past, cut, regular positions after the plan)
        orig = eng._compress

        def record(eng=eng, orig=orig, plans=plans, **kw):
            cut = eng.n_past - max(eng._recent(), kw.get("keep", 0))
            orig(**kw)
            plans.append((eng.n_past, cut, eng.ctx.pos_range()))

        eng._compress = record
        try:
            logits = eng.feed(tokens, all_logits=True)
            out[name] = (logits, plans, eng.refresh_stats(), eng.cells, eng.config.window)
        finally:
            eng.ctx.close()
    model.close()
    return tokens, out


def test_mid_prompt_plan_keeps_what_the_rest_of_the_prompt_leaves_room_for(runs) -> None:
    tokens, out = runs
    _, lazy, stats, cells, w = out["lazy"]
    _, eager, stats_e, _, _ = out["eager"]
    assert len(lazy) == 2 and len(eager) == 2  # one plan mid-prompt, one at its end
    (n_mid, cut, (p_min, p_max)), _ = lazy
    # after the plan, the regular cache holds exactly the tokens the rest of the prompt
    # leaves room for (the look-ahead probe's window included), oldest at ``cut``
    assert n_mid - cut == cells - w - (N - n_mid)
    assert (p_min, p_max) == (cut, n_mid - 1)
    (n_mid_e, cut_e, _), _ = eager
    assert n_mid_e == n_mid and cut < cut_e  # the eager plan moved every token but the recent part
    # the budget holds when feed() returns either way
    assert stats.reserve_ratio <= 0.25 + 1e-9 and stats_e.reserve_ratio <= 0.25 + 1e-9


def test_tokens_read_after_a_lazy_plan_are_closer_to_the_full_cache(runs) -> None:
    tokens, out = runs
    full = out["full"][0]
    n_mid = out["lazy"][1][0][0]
    after = slice(n_mid, N - 1)  # logits of tokens read after the mid-prompt plan
    targets = np.asarray(tokens[n_mid + 1:N])
    kld = {name: compare_logits(full[after], out[name][0][after], targets).mean_kld for name in ("lazy", "eager")}
    assert kld["lazy"] < kld["eager"], kld
