"""Budgets that mean what they say at every size (issue 16, items 4 and 5).

* The regular cache is allocated once, ``recent + 2·chunk`` cells whatever the budget, so
  a smaller ``--kv-budget`` never allocates more, and never more than the full cache of
  the longest context.
* A budget that no plan can meet within the longest context is refused before the
  model loads, with the smallest workable value.
* A conversation that fits in the regular cache is not compressed at all (reserve ratio
  1.0); from the first compression on the budget holds. Plans keep the conversation's
  first tokens (sinks and ``keep_start``), so a code stated at the start of 150-1,000
  words and asked for at the end is found by the default settings exactly when the full
  cache finds it — with the question in the same prompt, and read later (two feeds).
"""

from __future__ import annotations

import re
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from spindle_local.errors import UsageError
from spindle_local.eval.needle import key_found
from spindle_local.eval.runner import greedy_continue
from spindle_local.eval.texts import pydoc_text
from spindle_local.policy.inputs import Geometry
from spindle_local.runtime.config import EngineConfig
from tests.conftest import run_cli

BUDGETS = (1.0, 0.5, 0.25, 0.1, 0.05, 0.01)
SMOL = Geometry(n_layer=30, n_head=9, n_head_kv=3, head_dim_k=64, head_dim_v=64)  # SmolLM2-135M


@pytest.fixture(scope="module")
def model(default_model: Path):
    from spindle_local.runtime.lowlevel import LlamaModel

    m = LlamaModel(str(default_model))
    yield m
    m.close()


def _engine(default_model: Path, model, **kw):
    from spindle_local.runtime.engine import Engine

    return Engine(default_model, EngineConfig(**kw), model=model)


# -- item 4: allocation ------------------------------------------------------------------------


def test_allocation_never_grows_as_the_budget_shrinks(default_model: Path, model) -> None:
    """llama.cpp's KV bytes at start-up, per budget: non-increasing, at most the full cache."""
    held, cells = [], []
    for b in BUDGETS:
        eng = _engine(default_model, model, kv_budget=b)
        try:
            held.append(eng.kv_memory()[0])
            cells.append(eng.cells)
            full = eng.max_tokens * eng.bytes_per_token  # the whole f16 cache of the longest context
            assert eng.refresh_stats().full_bytes == 0
        finally:
            eng.ctx.close()
        assert held[-1] <= full, (b, held[-1], full)
    assert all(a >= b for a, b in zip(held, held[1:])), dict(zip(BUDGETS, held))
    assert all(a >= b for a, b in zip(cells, cells[1:])), dict(zip(BUDGETS, cells))
    # the issue measured 343 MiB at 0.05 and 73 MiB at 0.25: now the same small allocation
    assert max(held) <= 32 * 2**20, dict(zip(BUDGETS, held))


@pytest.mark.parametrize("recent, chunk, longest", [(256, 512, 8192), (64, 256, 8192), (256, 512, 1000),
                                                    (512, 2048, 4096), (32, 16, 200)])
def test_cells_do_not_depend_on_the_budget(recent: int, chunk: int, longest: int) -> None:
    cells = [EngineConfig(kv_budget=b, recent=recent, chunk=chunk).cells(longest) for b in BUDGETS]
    assert len(set(cells)) == 1
    c = cells[0]
    assert c % 256 == 0 and c <= -(-longest // 256) * 256  # whole blocks, never beyond the longest context
    assert c >= min(recent + 2 * chunk, longest)
    assert EngineConfig(recent=recent, chunk=chunk, max_tokens=longest).cells() == c


# -- item 4: impossible budgets ------------------------------------------------------------------


def test_smallest_budget_is_the_boundary() -> None:
    low = EngineConfig().smallest_budget(longest=8192, geometry=SMOL)
    assert 0.005 < low < 0.01  # window 32 + 16 of headroom + 4 sinks of 8,192 tokens
    EngineConfig(kv_budget=low * 1.0001).check_budget(longest=8192, geometry=SMOL)
    with pytest.raises(UsageError, match=r"smallest workable value is 0\.0064"):
        EngineConfig(kv_budget=low * 0.999).check_budget(longest=8192, geometry=SMOL)
    # a shorter --ctx needs a larger share; --policy full and --kv-mem are not budgets
    assert EngineConfig().smallest_budget(longest=1024, geometry=SMOL) > 6 * low
    EngineConfig(policy="full", kv_budget=1e-9).check_budget(longest=8192, geometry=SMOL)
    EngineConfig(kv_budget=1e-9, kv_mem=64 << 20).check_budget(longest=8192, geometry=SMOL)


@pytest.mark.parametrize("budget", ["0.001", "1e-9"])
def test_cli_refuses_an_impossible_budget_before_loading(default_model: Path, budget: str) -> None:
    t0 = time.perf_counter()
    r = run_cli("chat", "--kv-budget", budget, "--prompt", "hi")
    elapsed = time.perf_counter() - t0
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "smallest workable value is 0.0064" in lines[0], r.stderr
    assert r.stdout == ""
    assert elapsed < 15, elapsed  # nothing loaded: the issue's 1e-9 failed after 14 s allocating 768e9 cells


def test_engine_refuses_an_impossible_budget_before_the_context(default_model: Path, model) -> None:
    with pytest.raises(UsageError, match="smallest workable value"):
        _engine(default_model, model, kv_budget=0.001)
    with pytest.raises(UsageError, match="smallest workable value"):  # --ctx 2048: 0.01 cannot be met
        _engine(default_model, model, kv_budget=0.01, max_tokens=2048)


def test_a_tiny_workable_budget_stays_bounded(default_model: Path, model) -> None:
    """0.01 at 3,000 tokens: over budget until long enough, but the memory stays the allocation
    plus a sinks-and-window store (the issue's 0.001 grew to 17.6 GB of RSS)."""
    toks = model.tokenize(pydoc_text()[:20_000], add_special=True)[:3000]
    eng = _engine(default_model, model, kv_budget=0.01)
    try:
        alloc = eng.kv_memory()[0]
        eng.feed(toks)
        held = eng.kv_memory()[0]
        s = eng.refresh_stats()
        assert s.compressions >= 1 and eng.regular_count() <= eng.cells
        assert s.over_budget_compressions == s.compressions  # 30 tokens' worth: less than the window
        assert held < alloc + 0.05 * s.full_bytes, (held, alloc, s.full_bytes)
        assert 0 < s.store_bytes < 0.02 * s.full_bytes, s.as_dict()  # the forced plans keep the sinks only
        # the regular part is what is allocated anyway: KV held never exceeds the allocation plus that store
        assert s.kv_bytes <= eng.cells * eng.bytes_per_token + 0.05 * s.full_bytes, s.as_dict()
    finally:
        eng.ctx.close()


# -- item 5: when compression starts -------------------------------------------------------------


def test_nothing_is_compressed_while_the_conversation_fits(default_model: Path, model) -> None:
    """Up to the regular cache's cells the conversation is exact; past them the budget holds."""
    toks = model.tokenize(pydoc_text()[:12_000], add_special=True)
    eng = _engine(default_model, model)
    try:
        n = eng.cells - 24
        logits = eng.feed(toks[:266])  # the issue's 266-token prompt: it ended at ratio 0.205
        assert eng.stats.compressions == 0 and eng.refresh_stats().reserve_ratio == 1.0
        logits = eng.feed(toks[266:n])
        assert eng.stats.compressions == 0 and eng.refresh_stats().reserve_ratio == 1.0
        for _ in range(24):  # generation up to the last cell: still exact
            logits = eng.step(int(np.argmax(logits)))
        assert eng.n_past == eng.cells and eng.stats.compressions == 0
        for _ in range(4):  # the cache is full: the first plan, and the budget from then on
            logits = eng.step(int(np.argmax(logits)))
            assert eng.refresh_stats().reserve_ratio <= eng.config.kv_budget + 1e-9
        assert eng.stats.compressions == 1 and eng.stats.over_budget_compressions == 0
        # the plan kept the conversation's first tokens in every layer and KV head
        start = set(range(eng._protected_start()))
        assert eng._protected_start() == eng.config.keep_start
        for il in range(eng.geometry.n_layer):
            for h in eng.ctx.store_get(il).heads:
                assert start <= set(h.positions.tolist()), il
    finally:
        eng.ctx.close()


def _mid_prompt_plans(default_model: Path, model, toks: list[int], **kw) -> tuple[list[int], int, int]:
    """The regular tokens at each plan made while ``toks`` is read, the cells and the window."""
    eng = _engine(default_model, model, **kw)
    regular: list[int] = []
    plan = eng._compress

    def record(**args):
        if eng.n_past < len(toks):
            regular.append(eng.regular_count())
        return plan(**args)

    eng._compress = record
    try:
        eng.feed(toks)
        assert eng.stats.over_budget_compressions == 0
        assert eng.refresh_stats().reserve_ratio <= eng.config.kv_budget + 1e-9
        return regular, eng.cells, eng.config.window
    finally:
        eng.ctx.close()


def test_when_a_long_prompt_is_planned(default_model: Path, model) -> None:
    """While a prompt is read, a plan comes when the next whole chunk no longer fits beside the
    look-ahead probe's room (the default); with ``fill_cells`` only once a part-chunk has filled
    the cells, so the same prompt gets fewer plans."""
    toks = model.tokenize(pydoc_text()[:30_000], add_special=True)[:3000]
    chunked, cells, w = _mid_prompt_plans(default_model, model, toks, chunk=256, recent=64)
    filled, _, _ = _mid_prompt_plans(default_model, model, toks, chunk=256, recent=64, fill_cells=True)
    assert all(cells - r - w < 256 for r in chunked), (chunked, cells)  # the next chunk did not fit
    assert any(cells - r - w >= w for r in chunked), (chunked, cells)  # ... with cells still free
    assert filled and all(cells - r - w < w for r in filled), (filled, cells)  # the cells were full
    assert len(filled) < len(chunked), (filled, chunked)


# -- item 5: a code stated at the start, asked for at the end ------------------------------------


def _licence() -> str | None:
    p = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    return p.read_text(encoding="utf-8") if p.is_file() else None


def _filler(text: str, words: int, offset: int) -> str:
    runs = re.findall(r"\S+\s*", text)
    return "".join(runs[offset:offset + words]).strip()


QUESTION = "\nWhat is the secret code? The secret code is "


@pytest.fixture(scope="module")
def engines(default_model: Path, model):
    full = _engine(default_model, model, policy="full", n_cells=4096, max_tokens=4096)
    default = _engine(default_model, model)
    yield {"full": full, "default": default}
    default.ctx.close()
    full.ctx.close()


def _answer(eng, doc: list[int], question: list[int], form: str) -> str:
    eng.reset()
    if form == "one":  # chat --prompt: the document and the question in one prompt
        logits = eng.feed(doc + question)
    else:  # chat --file, then the question: two feeds
        eng.feed(doc)
        logits = eng.feed(question)
    return greedy_continue(eng, logits, max_new=8)


@pytest.mark.parametrize("source", ["licence", "pydoc"])
@pytest.mark.parametrize("words", [150, 500, 1000])
def test_a_code_at_the_start_is_found_as_by_the_full_cache(engines, model, source: str, words: int) -> None:
    """Plain completion form (SmolLM2-135M fails its own chat template at this), greedy.

    The licence text is dense (1,000 words are about 1,800 tokens, past the regular
    cache: compressed), pydoc's 1,000 words about 1,300."""
    text = _licence() if source == "licence" else pydoc_text()[:200_000]
    if text is None:
        pytest.skip("this Python ships no LICENSE.txt")
    rng = np.random.default_rng(words + (7 if source == "pydoc" else 0))
    found = {"full": [], "default": []}
    compressed = []
    for _ in range(2):
        key = str(int(rng.integers(10_000, 100_000)))
        doc = model.tokenize(f"The secret code is {key}. ", add_special=True) + \
            model.tokenize(_filler(text, words, int(rng.integers(0, 800))), add_special=False)
        question = model.tokenize(QUESTION, add_special=False)
        for form in ("one", "file"):
            for name, eng in engines.items():
                found[name].append(key_found(_answer(eng, doc, question, form), key))
            s = engines["default"].refresh_stats()
            compressed.append(s.compressions > 0)
            if s.compressions:
                assert s.reserve_ratio <= 0.25 + 1e-9
            else:
                assert len(doc) + len(question) + 8 <= engines["default"].cells
    # the defaults find every code the full cache finds (they may find more: at 1,000 words of
    # pydoc the full cache loses the code to the distraction the compressed run no longer holds)
    assert all(d or not f for d, f in zip(found["default"], found["full"])), found
    assert sum(found["default"]) >= 3, found
    if words <= 500:
        assert sum(found["full"]) >= 3, found  # the model itself retrieves it at these lengths
    if words <= 500:
        assert not any(compressed)  # README: shorter than the regular cache, not compressed at all


def test_chat_form_as_the_issue_reported(default_model: Path, tmp_path: Path) -> None:
    """The issue's forms through the CLI: one --prompt, and --file then the question. With the
    defaults the code is found exactly when --policy full finds it (it was lost before)."""
    text = _licence() or pydoc_text()
    doc = f"The secret code is 67326. {_filler(text, 150, 680)}"
    path = tmp_path / "doc.txt"
    path.write_text(doc, encoding="utf-8")
    runs = {"one": ["--prompt", doc + "\n\nWhat is the secret code?"],
            "file": ["--file", str(path), "--prompt", "What is the secret code?"]}
    found = {}
    for form, args in runs.items():
        for policy in ("full", "spindle"):
            r = run_cli("chat", "--policy", policy, "--temperature", "0", "--max-tokens", "16", *args)
            assert r.returncode == 0, r.stderr
            found[form, policy] = key_found(r.stdout.split("code is", 1)[-1], "67326")
    assert found["one", "spindle"] == found["one", "full"] and found["file", "spindle"] == found["file", "full"]
    assert found["one", "full"] or found["file", "full"], found
