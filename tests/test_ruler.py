"""The question-later protocols and the RULER-style suite: generated prompts, conversations, scoring.

Real model throughout (the default SmolLM2-135M), short contexts. The engines run with a
small ``--recent`` / ``--chunk`` so that a document of a few hundred tokens is compressed
when it has been read, as a long one is with the defaults.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

BUDGET = 0.25
SMALL = dict(recent=64, chunk=128)  # cells for ~512 tokens: a 700-token document is compressed when read


@pytest.fixture(scope="module")
def haystack() -> str:
    from spindle_local.eval.texts import pydoc_text

    return pydoc_text()[:60_000]


@pytest.fixture(scope="module")
def pair(default_model: Path):
    from spindle_local.eval.needle import EnginePair
    from spindle_local.runtime.config import EngineConfig

    cfg = EngineConfig(policy="spindle", kv_budget=BUDGET, n_threads=1, **SMALL)
    with EnginePair(str(default_model), cfg, 1400) as p:
        yield p


def _text(pair, tokens) -> str:
    return "".join(pair.model.token_to_piece(t) for t in tokens)


# -- generated tasks ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe"])
def test_generated_tasks_have_the_properties_claimed(pair, haystack: str, task: str) -> None:
    from spindle_local.eval.ruler import TASKS, RulerBuilder

    builder = RulerBuilder(pair.tokenize, pair.model.token_to_piece, haystack)
    for length in (600, 1000):
        rng = np.random.default_rng([7, TASKS.index(task), length])
        for _ in range(3):
            p = builder.build(task, length, rng)
            doc, q = _text(pair, p.document), _text(pair, p.question)
            if task == "cwe":
                assert length - 12 <= p.length <= length
            else:
                assert p.length == length  # exact lengths, like the pass-key prompts
            for r in p.references:
                assert r not in q  # the question never gives the answer away
            if task.startswith("niah"):
                needles = re.findall(r"special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", doc)
                asked = re.search(r"magic numbers? for ([a-z]+-[a-z]+) mentioned", q).group(1)
                values = [v for k, v in needles if k == asked]
                assert q.endswith(" ") and sorted(values) == sorted(p.references)
                if task == "niah_single":
                    assert len(needles) == 1
                elif task == "niah_multikey":
                    assert len(needles) == 4 and len({k for k, _ in needles}) == 4 and len(values) == 1
                else:
                    assert len(needles) == 4 and len(values) == 4 and len(set(values)) == 4
                assert p.single == (task != "niah_multivalue")
            elif task == "vt":
                value = re.search(r"assigned the value (\d+) in the text", q).group(1)
                chain = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)", doc)
                assert chain[0] == (p.references[0], value)  # the chain starts at the value, in document order
                assert [c[1] for c in chain[1:]] == [f"VAR {n}" for n in p.references[:-1]]
                assert [c[0] for c in chain] == p.references and len(set(p.references)) == 5
            else:
                counts = Counter(re.findall(r"^\d+\. (\S+)$", doc, flags=re.M))
                common = [counts[w] for w in p.references]
                rare = [c for w, c in counts.items() if w not in p.references]
                assert len(p.references) == 10 and rare
                assert min(common) >= 3 * max(rare)  # unambiguous even where the list was cut at the end
                assert f"{len(p.references)} most common words" in q
        # The same seed draws the same prompts: every protocol and policy sees the same ones.
        a = builder.build(task, length, np.random.default_rng(3))
        b = builder.build(task, length, np.random.default_rng(3))
        assert a.document == b.document and a.question == b.question and a.references == b.references


def test_score_answer() -> None:
    from spindle_local.eval.ruler import score_answer

    assert score_answer("7663441.\n\nThe", ["7663441"], single=True) == 1.0
    assert score_answer("1234567 or 7663441", ["7663441"], single=True) == 0.0  # the first number counts
    assert score_answer("4387208, 1111111 and 5422898.", ["4467090", "4387208", "5422898", "6743687"]) == 0.5
    assert score_answer(" OZOSW, bvrnf", ["OZOSW", "BVRNF", "ZVJKP"]) == pytest.approx(2 / 3)
    assert score_answer("listing", ["list"]) == 0.0  # whole words only


# -- the protocols, on the engine --------------------------------------------------------------


def test_question_later_compresses_before_the_question(pair, haystack: str) -> None:
    """The document is read and compressed alone; the question is a feed of its own; the full cache finds the key."""
    from spindle_local.eval.needle import NeedleBuilder, key_found
    from spindle_local.eval.runner import Conversation

    builder = NeedleBuilder(pair.tokenize, pair.model.token_to_piece, haystack)
    p = builder.build(700, 0.3, "52817")
    assert p.document + p.question == p.tokens and _text(pair, p.question).endswith("The pass key is ")
    full = Conversation(pair.full)
    full.read(p.document)
    assert key_found(full.ask(p.question, pair.tokenize(p.key)).answer, p.key)
    conv = Conversation(pair.comp)
    conv.read(p.document)
    eng = pair.comp
    assert eng.tokens == p.document  # nothing of the question has been seen ...
    assert conv.compressions_after_document >= 1  # ... when the document is compressed,
    assert conv.reserve_ratio_after_document <= BUDGET + 1e-9  # to the budget
    turn = conv.ask(p.question, pair.tokenize(p.key))
    assert turn.prefilled == len(p.question)
    assert eng.tokens[:len(p.tokens)] == p.tokens and eng.n_past > len(p.tokens)  # the answer follows
    assert turn.logprob is not None and turn.logprob < 0


def test_multi_question_asks_three_needles_without_rereading(pair, haystack: str) -> None:
    from spindle_local.eval.needle import DEFAULT_NAMED_NEEDLE, DEFAULT_NAMED_QUESTION, NeedleBuilder, key_found
    from spindle_local.eval.runner import Conversation

    builder = NeedleBuilder(pair.tokenize, pair.model.token_to_piece, haystack, needle=DEFAULT_NAMED_NEEDLE,
                            question=DEFAULT_NAMED_QUESTION)
    keys, names = ["48041", "46291", "12548"], ["Hana", "Priya", "Freya"]
    p = builder.build_multi(700, [0.1, 0.5, 0.9], keys, names)
    doc = _text(pair, p.document)
    assert [doc.index(f"for {n} is {k}.") for n, k in zip(names, keys)] == sorted(
        doc.index(f"for {n} is {k}.") for n, k in zip(names, keys))  # in depth order
    assert p.length == 700 and p.needle_starts == sorted(p.needle_starts)
    order = [2, 0, 1]
    full = Conversation(pair.full)
    full.read(p.document)
    assert all(key_found(full.ask(p.questions[i], pair.tokenize(keys[i])).answer, keys[i]) for i in order)
    conv = Conversation(pair.comp)
    conv.read(p.document)
    eng = pair.comp
    assert conv.compressions_after_document >= 1 and conv.reserve_ratio_after_document <= BUDGET + 1e-9
    held = list(eng.tokens)
    for i in order:
        turn = conv.ask(p.questions[i], pair.tokenize(keys[i]))
        assert turn.prefilled == len(p.questions[i])  # only the question's tokens: nothing is re-read
        assert eng.tokens[:len(held)] == held  # the conversation goes on after the answer
        held = list(eng.tokens)
    assert eng.stats.tokens_prefilled == len(p.document) + sum(len(q) for q in p.questions)
    assert eng.stats.tokens_generated > 0


def test_answer_logprob_is_teacher_forcing_and_changes_nothing(pair, haystack: str) -> None:
    from spindle_local.eval.needle import NeedleBuilder
    from spindle_local.eval.runner import _log_softmax, answer_logprob, greedy_continue

    p = NeedleBuilder(pair.tokenize, pair.model.token_to_piece, haystack).build(300, 0.5, "70381")
    ref = pair.tokenize(p.key)
    assert len(ref) > 1
    eng = pair.full
    eng.reset()
    rows = eng.feed(p.tokens + ref[:-1], all_logits=True)[len(p.tokens) - 1:]
    expected = sum(_log_softmax(rows[i])[t] for i, t in enumerate(ref))
    for eng in (pair.full, pair.comp):
        eng.reset()
        logits = eng.feed(p.tokens)
        before = (list(eng.tokens), eng.stats.tokens_prefilled, eng.stats.compressions)
        lp = answer_logprob(eng, logits, ref)
        assert (list(eng.tokens), eng.stats.tokens_prefilled, eng.stats.compressions) == before
        if eng is pair.full:
            assert lp == pytest.approx(expected, abs=0.05)
            continue
        scored = greedy_continue(eng, logits)
        eng.reset()
        assert greedy_continue(eng, eng.feed(p.tokens)) == scored  # the answer is the one without scoring


# -- the command ------------------------------------------------------------------------------


def test_eval_ruler_command(default_model: Path, haystack: str, tmp_path: Path) -> None:
    hay = tmp_path / "hay.txt"
    hay.write_text(haystack[:30_000])
    proc = run_cli("eval", "ruler", str(default_model), "--tasks", "niah_single", "--lengths", "700",
                   "--samples", "1", "--protocol", "both", "--kv-budget", str(BUDGET), "--recent", "64",
                   "--chunk", "128", "--threads", "1", "--haystack", str(hay), "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["haystack"] == str(hay) and r["policy"] == "spindle" and r["protocols"] == ["in-prompt", "later"]
    rows = {x["protocol"]: x for x in r["rows"]}
    assert set(rows) == {"in-prompt", "later"} and all(x["task"] == "niah_single" for x in rows.values())
    for x in rows.values():
        assert x["n"] == 1 and x["tokens"] == 700 and x["score_full"] == 1.0  # the full cache finds the value
        assert 0.0 <= x["score"] <= 1.0 and x["reserve_ratio"] <= BUDGET + 0.05
    assert rows["later"]["reserve_ratio_after_document"] <= BUDGET + 1e-9
    s = r["summary"]["niah_single"]["later"]
    assert {"score", "score_full", "relative", "delta", "logprob_delta"} <= s.keys()


@pytest.mark.parametrize("args, phrase", [
    (["eval", "ruler", "--tasks", "niah_single,qa"], "--tasks"),
    (["eval", "ruler", "--protocol", "multi"], "--protocol"),
    (["eval", "ruler", "--lengths", "20000"], "trained context"),
    (["eval", "needle", "--protocol", "multi", "--needle", "The code is {key}."], "{name}"),
    (["bench", "--out", "/tmp/never", "--protocols", "later,sometimes"], "--protocols"),
])
def test_invalid_arguments_exit_2(default_model: Path, args: list[str], phrase: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and phrase in lines[0]
