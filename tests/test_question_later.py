"""Documents read before their questions: the default policy keeps what later questions ask for.

Real model (the default SmolLM2-135M), the engines of ``eval needle`` on fixed prompts. A
small ``recent`` / ``chunk`` makes a document of about a thousand tokens compress when it
has been read, as a long one does with the defaults; the rest of the settings are the
defaults. Keys the full cache misses are not held against the policy (the scores are
relative), but the full cache must find most of them or the test has lost its meaning.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.model  # every test here loads a model (or the patched library)

SMALL = dict(recent=64, chunk=128)
VAULT = ("The combination of the vault is {key}. Nobody else knows it.",
         "What is the combination of the vault? The combination of the vault is ")


def _config(**kw):
    from spindle_local.runtime.config import EngineConfig

    return EngineConfig(policy="spindle", kv_budget=0.25, n_threads=2, **SMALL, **kw)


def _found(result: dict) -> tuple[int, int, int]:
    cells = result["cells"]
    return (sum(c["correct_both"] for c in cells), sum(c["correct_full"] for c in cells),
            sum(c["n"] for c in cells))


@pytest.mark.parametrize("phrasing", ["pass key", "vault"])
def test_a_key_asked_after_the_document_is_found_as_by_the_full_cache(default_model: Path, phrasing: str) -> None:
    from spindle_local.eval.needle import run_needle
    from spindle_local.eval.texts import pydoc_text

    needle, question = VAULT if phrasing == "vault" else (None, None)
    r = run_needle(str(default_model), lengths=[1000], depths=[0.1, 0.5, 0.9], samples=2, seed=11,
                   engine_config=_config(), haystack=pydoc_text()[:80_000], needle=needle, question=question,
                   protocol="later")
    both, full, n = _found(r)
    assert r["reserve_ratio_after_document"] <= 0.25 + 1e-9 and r["question_reread_tokens"] == 0
    assert full >= n - 1, r["cells"]  # the model itself retrieves these keys
    assert both == full, r["cells"]  # every key the full cache finds


def test_three_keys_asked_in_turn_are_found_as_by_the_full_cache(default_model: Path) -> None:
    """Default settings throughout: a 2,000-token document is past the regular cache (1,280
    cells) and compressed when read; three named keys of one template compete for the
    protected share, the case a share too small for several facts would fail."""
    from spindle_local.eval.needle import run_needle
    from spindle_local.eval.texts import pydoc_text
    from spindle_local.runtime.config import EngineConfig

    r = run_needle(str(default_model), lengths=[2000], depths=[0.1, 0.5, 0.9], samples=2, seed=5,
                   engine_config=EngineConfig(policy="spindle", kv_budget=0.25, n_threads=2),
                   haystack=pydoc_text()[:80_000], protocol="multi")
    assert r["reserve_ratio_after_document"] <= 0.25 + 1e-9
    both, full, n = _found(r)
    assert r["question_reread_tokens"] == 0
    # SmolLM2-135M itself confuses keys stated in one template (about half are found):
    # the test needs enough of them to mean something
    assert full >= n // 2, r["cells"]
    assert both == full, r["turns"]
    assert all(t["correct_both"] == t["correct_full"] for t in r["turns"])


def test_a_restatement_that_opens_its_sentence_is_kept_to_its_end(default_model: Path) -> None:
    """"K is the pass key." opens its sentence: what the number is comes after it, and a
    question read later needs those words. With the defaults (``salient.opening`` 8) a
    document read at 0.15 keeps both sentences that state the key ("The pass key is K." and
    "K is the pass key.") in every layer and KV head; with ``salient.opening=0`` the restatement keeps
    only ``after`` tokens and the rest is left to the window, which scores how the text goes
    on, not what the needle says (" pass key." is then lost in every layer)."""
    import numpy as np

    from spindle_local.eval.needle import DEFAULT_NEEDLE, NeedleBuilder
    from spindle_local.eval.texts import pydoc_text
    from spindle_local.runtime import native
    from spindle_local.runtime.config import EngineConfig
    from spindle_local.runtime.engine import Engine

    eng = Engine(str(default_model), EngineConfig(policy="spindle", kv_budget=0.15, n_threads=2, **SMALL))
    try:
        tok = lambda s: eng.model.tokenize(s, add_special=False)  # noqa: E731
        builder = NeedleBuilder(tok, eng.model.token_to_piece, pydoc_text()[:80_000])
        p = builder.build(1500, 0.5, "48152")
        whole = tok("\n" + DEFAULT_NEEDLE.format(key="48152"))
        first, second = tok("\nThe pass key is 48152."), tok("\nThe pass key is 48152. Remember it.")
        assert whole[:len(second)] == second and second[:len(first)] == first and tok("\n") == first[:1]
        # the two sentences that state the key ("Remember it." between them is no fact)
        needle = [p.needle_start + i for i in range(1, len(first))] + \
                 [p.needle_start + i for i in range(len(second), len(whole))]
        assert [eng.model.token_to_piece(p.tokens[t]) for t in needle[:4]] == ["The", " pass", " key", " is"]
        eng.feed(p.document)
        assert eng.stats.compressions >= 2
        _, _, regular = native.read_layer_kv(eng.ctx, eng.store_layer_ids[0])
        assert min(needle) < int(regular.min())  # the needle was compressed
        missing = {}
        for il in eng.store_layer_ids:
            n_slot_head, pos = eng._store_meta[il]
            for h in range(len(n_slot_head)):
                held = set(pos[h, :n_slot_head[h]].tolist()) | set(regular.tolist())
                lost = [t for t in needle if t not in held]
                if lost:
                    missing[(il, h)] = [eng.model.token_to_piece(p.tokens[t]) for t in lost]
        assert not missing, missing
    finally:
        eng.close()


def test_random_names_are_kept_whole(default_model: Path) -> None:
    """RULER's variable tracking names variables with five random capitals, which the
    tokenizer cuts into pieces (" U", "H", "K", "WG"). A document read before its question
    keeps every piece of every name where it is assigned ("VAR UHKWG = ..."), in every layer
    and KV head: kept by its first piece alone, a name is answered as one that does not
    exist ("UHKY" for "UHKWG"). Default cells: the chain of five assignments in 2,000
    tokens."""
    import numpy as np

    from spindle_local.eval.ruler import RulerBuilder
    from spindle_local.eval.texts import pydoc_text
    from spindle_local.runtime import native
    from spindle_local.runtime.config import EngineConfig
    from spindle_local.runtime.engine import Engine

    eng = Engine(str(default_model), EngineConfig(policy="spindle", kv_budget=0.25, n_threads=2))
    try:
        tok = lambda s: eng.model.tokenize(s, add_special=False)  # noqa: E731
        piece = eng.model.token_to_piece
        p = RulerBuilder(tok, piece, pydoc_text()[:80_000]).build("vt", 2000, np.random.default_rng(3))
        pieces = [piece(t) for t in p.document]
        ends = np.cumsum([len(x) for x in pieces])  # each token's end in the document's text
        text = "".join(pieces)
        spans = {}  # name -> token indices of its assignment
        for name in p.references:
            at = text.index("VAR " + name + " =") + 3  # the space before the name
            spans[name] = list(range(int(np.searchsorted(ends, at + 1)), int(np.searchsorted(ends, at + len(name) + 1)) + 1))
            assert "".join(pieces[t] for t in spans[name]) == " " + name
        assert all(len(s) >= 3 for s in spans.values())  # cut into pieces
        eng.feed(p.document)
        assert eng.stats.compressions >= 1
        _, _, regular = native.read_layer_kv(eng.ctx, eng.store_layer_ids[0])
        assert sum(s[-1] < int(regular.min()) for s in spans.values()) >= 3  # most names were compressed
        missing = {}
        for il in eng.store_layer_ids:
            n_slot_head, pos = eng._store_meta[il]
            for h in range(len(n_slot_head)):
                held = set(pos[h, :n_slot_head[h]].tolist()) | set(regular.tolist())
                lost = [name for name, s in spans.items() if not set(s) <= held]
                if lost:
                    missing[(il, h)] = lost
        assert not missing, missing
    finally:
        eng.close()


def test_small_budgets_keep_every_key_of_a_document(default_model: Path) -> None:
    """Three named keys, each stated and restated ("The pass key for N is K. Remember it. K
    is the pass key for N."), in a 2,000-token document read at 0.15. A salient share of a
    quarter of the smallest layer (``salient.tokens=0``) holds two facts with their
    restatements, not three: ranked as the runs rank (each restatement with its statement)
    one key is lost in (nearly) every layer. Each key is held in every layer and KV head by the
    defaults, whose share is at least ``salient.tokens`` (96) tokens, and by that quarter
    with ``salient.echo_last`` (every statement before any restatement)."""
    from spindle_local.eval.needle import DEFAULT_NAMED_NEEDLE, DEFAULT_NAMED_QUESTION, NeedleBuilder
    from spindle_local.eval.texts import pydoc_text
    from spindle_local.runtime import native
    from spindle_local.runtime.config import EngineConfig
    from spindle_local.runtime.engine import Engine

    keys, names = ["48152", "73906", "15937"], ["Maria", "Oliver", "Priya"]

    def keys_held(**stages) -> list[int]:
        """Per key: the (layer, KV head) pairs that hold all of its first statement's digits."""
        eng = Engine(str(default_model), EngineConfig(policy="spindle", kv_budget=0.15, n_threads=2, **SMALL,
                                                      stages={k.replace("__", "."): v for k, v in stages.items()}))
        try:
            tok = lambda s: eng.model.tokenize(s, add_special=False)  # noqa: E731
            builder = NeedleBuilder(tok, eng.model.token_to_piece, pydoc_text()[:80_000],
                                    needle=DEFAULT_NAMED_NEEDLE, question=DEFAULT_NAMED_QUESTION)
            p = builder.build_multi(2000, [0.1, 0.5, 0.9], keys, names)
            eng.feed(p.document)
            assert eng.stats.compressions >= 2
            _, _, regular = native.read_layer_kv(eng.ctx, eng.store_layer_ids[0])
            out = []
            for start, key, name in zip(p.needle_starts, keys, names):
                stated = len(tok(f"\nThe pass key for {name} is {key}"))
                digits = [start + j for j in range(stated - len(key), stated)]
                assert "".join(eng.model.token_to_piece(p.document[t]) for t in digits) == key
                assert max(digits) < int(regular.min())  # compressed
                held = 0
                for il in eng.store_layer_ids:
                    n_slot_head, pos = eng._store_meta[il]
                    for h in range(len(n_slot_head)):
                        held += set(digits) <= set(pos[h, :n_slot_head[h]].tolist())
                out.append(held)
            return out
        finally:
            eng.close()

    pairs = 30 * 3  # SmolLM2-135M: 30 layers x 3 KV heads
    assert keys_held() == [pairs] * 3
    assert keys_held(salient__tokens=0, salient__echo_last=True) == [pairs] * 3
    # the share spent on restatements loses a key in (nearly) every layer
    assert min(keys_held(salient__tokens=0)) <= 3
