"""The compression schedule (runtime/schedule.py), rule by rule, without a model."""

from __future__ import annotations

import pytest

from spindle_local.runtime.schedule import Schedule, compress_due, needs_compress

T = 23_040  # SmolLM2-135M: bytes per token of the f16 cache


def sched(**kw) -> Schedule:
    base = dict(n_past=4000, kv_budget=0.25, bytes_per_token=T, window=32, recent=256, sinks=4,
                keep_start=64, decode_slack=128)
    return Schedule(**(base | kw))


@pytest.mark.parametrize("n_past, budget, recent, expected", [
    (4000, 0.25, 256, 250),     # a quarter of the budget at this length is below --recent
    (8000, 0.25, 256, 256),     # --recent
    (100, 0.25, 256, 32),       # never fewer than the window
    (20000, 0.4, 1000, 1000),
])
def test_recent_tokens(n_past, budget, recent, expected):
    assert sched(n_past=n_past, kv_budget=budget, recent=recent).recent_tokens() == expected


@pytest.mark.parametrize("n_past, keep_start, sinks, expected", [
    (4000, 64, 4, 64),     # keep_start fits in a quarter of the budget
    (400, 64, 4, 25),      # capped by a quarter of the budget: int(0.25 * 0.25 * 400)
    (40, 64, 4, 4),        # the sinks always
    (4000, 0, 4, 4),
])
def test_protected_start(n_past, keep_start, sinks, expected):
    assert sched(n_past=n_past, keep_start=keep_start, sinks=sinks).protected_start() == expected


@pytest.mark.parametrize("n_past, slack, expected", [(4000, 128, 128), (1000, 128, 62), (10, 128, 16)])
def test_slack(n_past, slack, expected):
    assert sched(n_past=n_past, decode_slack=slack).slack() == expected


@pytest.mark.parametrize("n_past, prompt_end, growth", [(4000, None, 0), (4000, None, 128), (2000, 6000, 0)])
def test_target_keeps_the_ratio_within_budget_for_growth_tokens(n_past, prompt_end, growth):
    s = sched(n_past=n_past, prompt_end=prompt_end)
    store, r, b = s.target_bytes(growth), s.recent_tokens(), s.kv_budget
    n = max(n_past, prompt_end or 0)
    for j in (0, growth // 2, growth):
        assert (store + (r + j) * T) / ((n + j) * T) <= b + 1e-12
    assert (store + (r + growth + 1) * T) / ((n + growth + 1) * T) > b - 1e-3  # and uses what it may


def test_mid_prompt_targets_the_prompt_length_and_a_cap_overrides_everything():
    mid = sched(n_past=2000, prompt_end=6000)  # plans for the length the prompt will have
    assert mid.recent_tokens() == 125 and mid.target_bytes(0) == int(0.25 * 6000 * T - 125 * T)
    capped = sched(layout_recent=300, layout_store_cap=10 * 2**20)
    assert capped.target_bytes(500) == 10 * 2**20 and capped.recent_tokens() == 300
    assert capped.protected_start() == min(64, 10 * 2**20 // (4 * T))


@pytest.mark.parametrize("regular, incoming, cells, allowance, capped, needs, due", [
    (100, 1, 1280, None, False, False, False),   # before the first plan: only a full cache
    (1280, 1, 1280, None, False, False, True),
    (300, 1, 1280, 300, False, True, True),      # past the plan's allowance
    (299, 1, 1280, 300, False, False, False),
    (300, 1, 1280, 300, True, False, False),     # under a cap: only a full cache
    (1000, 512, 1280, None, True, False, True),
])
def test_when_a_compression_is_due(regular, incoming, cells, allowance, capped, needs, due):
    assert needs_compress(regular=regular, incoming=incoming, allowance=allowance, capped=capped) is needs
    assert compress_due(regular=regular, incoming=incoming, cells=cells, allowance=allowance, capped=capped) is due

