"""Salient runs (policy/salience.py): numbers and names kept with what introduces them."""

from __future__ import annotations

import numpy as np
import pytest

from spindle_local.policy import Geometry, make_policy
from spindle_local.policy.salience import (
    ECHO,
    ENDS,
    OPENS,
    STOPS,
    run_heads,
    run_order,
    run_priority,
    run_positions,
    run_positions_ref,
    salient_positions,
    salient_runs,
    salient_scan,
    salient_tokens,
    scan_pieces,
    echo_marks,
    restated_runs,
    run_tails,
    token_information,
    token_information_ref,
)
from spindle_local.policy.synthetic import make_layers

GEO = Geometry(n_layer=6, n_head=6, n_head_kv=2, head_dim_k=16, head_dim_v=16)


def test_salient_tokens_rule() -> None:
    pieces = ["The", " pass", " key", " is", " ", "4", "8", "1", "5", "2", ".", " Alice", " met",
              " Bob", " in", " Paris", ".", "\n", "Then", " nothing", " else", " happened", " in", " 1999"]
    got = [p for p, s in zip(pieces, salient_tokens(pieces)) if s]
    # digits and mid-sentence capitals; sentence-initial capitals ("Alice", "Then", "The") are not names
    assert got == ["4", "8", "1", "5", "2", " Bob", " Paris", " 1999"]
    assert not salient_tokens([]).any()


def test_codes_split_by_the_tokenizer_are_salient_whole() -> None:
    pieces = ["Then", " VAR", " U", "H", "K", "WG", " =", " ", "1", "6", " and", " x", "7", "f", "ab", " or",
              " Keyboard", "Inter", "rupt", " in", " 3", "rd", " UN", "ix", " THE", " WAR", "RAN", "TY", " ok"]
    got = [p for p, s in zip(pieces, salient_tokens(pieces)) if s]
    # a digit goes on to the end of its word, and so do pieces of one or two capitals; a
    # natural word does not, capitalised or in capitals
    assert got == [" VAR", " U", "H", "K", "WG", "1", "6", "7", "f", "ab", " Keyboard", " 3", "rd", " UN",
                   " THE", " WAR"]


@pytest.mark.parametrize("cut", range(0, 35, 3))
def test_salient_tokens_in_parts(cut: int) -> None:
    """A text classified in two parts (the engine extends its flags as it reads) gives what
    the whole text gives, wherever the cut falls: mid-sentence, after a sentence end, on a
    newline, inside a code."""
    pieces = ["The", " pass", " key", " is", " ", "4", "8", ".", " Alice", " met", " Bob", ".", "\n",
              "Then", " Carol", " left", ":", " Dave", " said", " 12", ".", " ", "\n", " Eve", " Frank",
              " and", " U", "H", "K", "WG", " x", "7", "f", "ab", " end"]
    head, marks, ended = scan_pieces(pieces[:cut])
    tail, _ = salient_scan(pieces[cut:], ended, int(marks[-1]) if cut else 0)
    assert np.concatenate([head, tail]).tolist() == salient_tokens(pieces).tolist()


def test_sentence_marks() -> None:
    pieces = ["The", " key", " is", " ", "4", "8", ".", " ", "4", "8", " is", " the", " key", ".", "\n", "Bob"]
    flags, marks, ended = scan_pieces(pieces)
    assert np.array_equal(flags, salient_tokens(pieces)) and ended is False
    opens = [i for i, m in enumerate(marks) if m & OPENS]
    ends = [i for i, m in enumerate(marks) if m & ENDS]
    assert opens == [0, 7, 8, 14, 15]  # the start, then each piece after a sentence end up to a word
    assert ends == [6, 13, 14]
    head = scan_pieces(pieces[:8])
    tail = scan_pieces(pieces[8:], head[2])
    assert np.array_equal(np.concatenate([head[1], tail[1]]), marks)  # read in parts, as the engine does


def test_a_run_that_opens_its_sentence_keeps_the_words_after_it() -> None:
    # "The key is 48. 48 is the key. Later 7 and more." as positions 0..; runs at 4-5, 8-9, 16
    n = 22
    sal = np.zeros(n, bool)
    sal[[4, 5, 8, 9, 16]] = True
    marks = np.zeros(n, np.uint8)
    marks[[0, 7, 8, 15]] |= OPENS
    marks[[6, 13, 21]] |= ENDS
    pos = np.arange(n)
    assert run_tails(pos, sal, marks, after=2, opening=8).tolist() == [2, 4, 2]  # 8-9 keeps " is the key."
    assert run_tails(pos, sal, marks, after=2, opening=3).tolist() == [2, 2, 2]  # its end is too far
    assert run_tails(pos, sal, None, after=2, opening=8).tolist() == [2, 2, 2]
    assert run_tails(pos, sal, marks, after=5, opening=8).tolist() == [5, 5, 5]  # never fewer than after
    kept = salient_positions(pos, sal, np.zeros(n), before=1, after=1, cap=100, marks=marks, opening=8)
    assert set(range(7, 14)) <= set(kept.tolist()) and 14 not in kept
    gap = pos[pos != 13]  # the sentence end dropped everywhere: not seen, the run keeps after
    g_sal, g_marks = sal[pos != 13], marks[pos != 13]
    assert run_tails(gap, g_sal, g_marks, after=2, opening=8).tolist() == [2, 2, 2]


def test_a_run_keeps_context_within_its_sentence() -> None:
    """With ``sentence`` the words kept around a run stop at full stops (and line breaks): "x y. The key is
    48. 48 is the key. Later: 7 and more." keeps "The key is 48." for the first run (not
    the sentence before it), "48 is the key." for the second (not the first's end), and
    "Later: 7 and" for the third (a colon does not bound it), where 8 before and 2 after
    would cross the full stops."""
    n = 26
    # x0 y1 .2 | The3 key4 is5 4-6 8-7 .8 | 4-9 8-10 is11 the12 key13 .14 | Later15 :16 7-17 and18 more19 ...
    sal = np.zeros(n, bool)
    sal[[6, 7, 9, 10, 17]] = True
    marks = np.zeros(n, np.uint8)
    marks[[0, 3, 9, 15, 17]] |= OPENS
    marks[[2, 8, 14, 25]] |= ENDS | STOPS
    marks[16] |= ENDS
    pos = np.arange(n)
    assert run_heads(pos, sal, marks, before=8, sentence=True).tolist() == [3, 0, 2]
    assert run_heads(pos, sal, marks, before=2, sentence=True).tolist() == [2, 0, 2]
    assert run_heads(pos, sal, marks, before=8, sentence=False).tolist() == [8, 8, 8]
    assert run_heads(pos, sal, None, before=8, sentence=True).tolist() == [8, 8, 8]  # marks unknown
    assert run_tails(pos, sal, marks, after=2, opening=0, sentence=True).tolist() == [1, 2, 2]
    assert run_tails(pos, sal, marks, after=2, opening=8, sentence=True).tolist() == [1, 4, 8]  # ":" opens one
    assert run_tails(pos, sal, marks, after=2, opening=8, sentence=False).tolist() == [2, 4, 8]
    kept = salient_positions(pos, sal, np.zeros(n), before=8, after=2, cap=100, marks=marks, opening=8,
                             sentence=True)
    assert kept.tolist() == list(range(3, 26))
    wide = salient_positions(pos, sal, np.zeros(n), before=8, after=2, cap=100, marks=marks, opening=8)
    assert set(range(0, 3)) <= set(wide.tolist())  # without the bound the sentence before is kept too
    gap = pos != 14  # a full stop dropped everywhere is not seen: the bound is the one before it
    assert run_heads(pos[gap], sal[gap], marks[gap], before=8, sentence=True).tolist() == [3, 0, 8]


def test_runs_widen_once_every_run_holds_its_sentence() -> None:
    """Two one-token facts at 10 and 30, each 3 tokens after a full stop (6, 26); the one at
    30 ranks first. 8 tokens before each do not fit twice in 12: without the bound the
    second fact is dropped; with it both keep their sentence, and ``widen`` spends what is
    left on the first-ranked fact's wider context, and on the second's when there is room."""
    n = 40
    pos = np.arange(n)
    sal = np.zeros(n)
    sal[10], sal[30] = 1.0, 2.0
    marks = np.zeros(n, np.uint8)
    marks[[6, 26]] |= ENDS | STOPS
    marks[[7, 27]] |= OPENS

    def kept(cap: int, **kw) -> list[int]:
        return salient_positions(pos, sal, np.zeros(n), before=8, after=0, cap=cap, **({"marks": marks} | kw)).tolist()

    assert kept(12) == list(range(22, 31))  # unbounded: the second fact does not fit
    bounded = list(range(7, 11)) + list(range(27, 31))
    assert kept(12, sentence=True) == bounded
    assert kept(12, sentence=True, widen=True) == bounded  # no room to widen either
    assert kept(14, sentence=True, widen=True) == list(range(7, 11)) + list(range(22, 31))
    assert kept(18, sentence=True, widen=True) == list(range(2, 11)) + list(range(22, 31))
    assert kept(18, sentence=True, widen=True) == kept(18)  # room for both: what no bound keeps
    assert kept(14, sentence=True, widen=True, marks=None) == kept(14)  # marks unknown: no bound


def test_full_stops_are_marked() -> None:
    pieces = ["The", " key", " is", ":", " ", "4", "8", ".", " Bob", "?", "\n", "Eve", ".\n", "x", "y", "\n",
              "Key", ":\n", "7", "-", "8"]
    _, marks, _ = scan_pieces(pieces)
    # full stops, "?" and line breaks; not a colon, a dash, or a line break after a colon (a label)
    assert [i for i, m in enumerate(marks) if m & STOPS] == [7, 9, 10, 12, 15]
    assert [i for i, m in enumerate(marks) if m & ENDS] == [3, 7, 9, 10, 12, 15, 17, 19]


def test_runs() -> None:
    s = np.array([0, 1, 1, 0, 0, 1, 0, 1, 1, 1], bool)
    starts, ends = salient_runs(s)
    assert starts.tolist() == [1, 5, 7] and ends.tolist() == [2, 5, 9]


@pytest.mark.parametrize("seed", range(6))
def test_run_kernel_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    positions = np.sort(rng.choice(2000, size=n, replace=False)).astype(np.int64)  # gaps, as in a store
    salient = rng.random(n) < 0.1
    n_runs = len(salient_runs(salient)[0])
    order = rng.permutation(n_runs)
    tails = rng.integers(0, 12, n_runs)
    heads = rng.integers(0, 12, n_runs)
    tiers = (np.stack([heads, heads + rng.integers(0, 9, n_runs)]), np.stack([tails, tails + 4]))
    for before, after in ((0, 0), (8, 2), (30, 30), (8, tails), (heads, tails), tiers, (heads, tiers[1])):
        for cap in (0, 5, 40, 10_000):
            got = run_positions(positions, salient, order, before, after, cap)
            ref = run_positions_ref(positions, salient, order, before, after, cap)
            assert np.array_equal(got, ref), (before, cap)
            assert len(got) <= cap
            assert np.isin(got, positions).all()
    # one order per tier: a tier that walks some runs (the restatements' walk), then all
    some, rest = order[: n_runs // 2], order[n_runs // 2:]
    for cap in (0, 5, 40, 10_000):
        walks = [rest, some, order]
        b3, a3 = np.stack([heads, heads, heads + 3]), np.stack([tails, tails, tails + 2])
        got = run_positions(positions, salient, walks, b3, a3, cap)
        assert np.array_equal(got, run_positions_ref(positions, salient, walks, b3, a3, cap)), cap
        assert len(got) <= cap


def test_order_prefers_attended_then_newest_runs() -> None:
    pos = np.arange(20)
    sal = np.zeros(20, bool)
    sal[[2, 8, 15]] = True
    strength = np.zeros(20)
    strength[8] = 0.5
    assert run_order(pos, sal, strength).tolist() == [1, 2, 0]  # the attended run, then newest first
    kept = salient_positions(pos, sal, strength, before=2, after=1, cap=4)
    assert kept.tolist() == [6, 7, 8, 9]


def test_spindle_keeps_salient_runs_in_every_layer() -> None:
    """A run the window never looks at survives a small budget only when salience is on."""
    layers = make_layers(GEO, n=600, w=8, r=16, seed=3)
    flags = np.zeros(600, bool)
    flags[300:305] = True  # "48152" in the middle of the document
    for inp in layers:
        assert np.array_equal(inp.positions, np.arange(600))
        inp.salient = flags
    target = 60_000
    base = make_policy("spindle", {"codebooks": "off", "salient": "off"}).plan(layers, GEO, target)
    on = make_policy("spindle", {"codebooks": "off", "salient.share": 0.25, "salient.before": 6,
                                 "salient.after": 2}).plan(layers, GEO, target)
    want = set(range(294, 307))  # 6 before, the run 300-304, 2 after
    pos0 = 0
    for st in on:
        for h in st.heads:
            assert want <= {int(p) - pos0 for p in h.positions}, st.layer
    lost = [st.layer for st in base for h in st.heads if not want <= {int(p) - pos0 for p in h.positions}]
    assert lost, "the synthetic window should not keep the run by itself"


def test_salient_share_has_a_floor_in_tokens_at_small_budgets() -> None:
    """Where a quarter of the smallest layer holds fewer than ``salient.tokens`` tokens, the
    runs get that many (at most half of the layer), so a document's facts survive small budgets."""
    from spindle_local.policy.budgets import raw_slot_bytes

    layers = make_layers(GEO, n=600, w=8, r=16, seed=3)
    flags = np.zeros(600, bool)
    for start in range(40, 560, 20):  # 26 five-token codes: more than any cap here
        flags[start:start + 5] = True
    for inp in layers:
        inp.salient = flags

    def held(target: int, **settings) -> tuple[int, int]:
        pol = make_policy("spindle", {"codebooks": "off", "salient.share": 0.25, **settings})
        pol.plan(layers, GEO, target)
        rep = pol.last_report
        smallest = min(r["share_bytes"] for r in rep) // raw_slot_bytes(GEO)
        return rep[0]["salient_tokens"], smallest

    small, smallest = held(40_000, **{"salient.tokens": 0})
    assert small <= smallest // 4
    floored, _ = held(40_000, **{"salient.tokens": 96})
    assert small < floored <= min(96, smallest // 2) and floored > smallest // 4
    # a larger budget: the share is more than the floor, which then changes nothing
    big, big_smallest = held(400_000, **{"salient.tokens": 0})
    assert big_smallest // 4 > 96 and held(400_000, **{"salient.tokens": 96})[0] == big


def test_priority_prefers_rare_long_runs_over_repeated_ones() -> None:
    # ids: 7 = a name repeated three times, 1..5 = a five-digit code stated once, 9 = filler
    ids = np.array([9, 7, 9, 9, 7, 9, 1, 2, 3, 4, 5, 9, 7, 9])
    sal = np.isin(ids, [1, 2, 3, 4, 5, 7])
    prio = run_priority(ids, sal)
    assert (prio[~sal] == 0).all() and (prio[sal] > 0).all()
    assert prio[6] > prio[1] and prio[6] == prio[10]
    order = run_order(np.arange(len(ids)), prio, np.zeros(len(ids)))
    starts, _ = salient_runs(sal)
    assert starts[order[0]] == 6  # the code first


@pytest.mark.parametrize("seed", range(6))
def test_token_information_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, int(rng.integers(1, 60)), int(rng.integers(0, 400)))
    assert np.allclose(token_information(ids), token_information_ref(ids))


def test_a_code_stated_once_is_news_and_its_second_copy_is_not() -> None:
    # 20..24 = a five-digit code stated twice; 7 = a name the text repeats; 1..6 = prose
    prose = [1, 2, 3, 4, 5, 6] * 8
    ids = np.array(prose[:20] + [7, 1] + [20, 21, 22, 23, 24] + [2, 3] + [20, 21, 22, 23, 24] + prose[:12]
                   + [7, 2] + prose[12:30] + [7, 3])
    info = token_information(ids)
    first, second = slice(22, 27), slice(29, 34)
    assert info[first].sum() > 2 * info[second].sum()
    assert info[first].min() > info[:20].max()  # unlike anything before it
    sal = np.isin(ids, [7, 20, 21, 22, 23, 24])
    prio = run_priority(ids, sal)
    assert prio[22] > prio[29] > 0 and prio[22] > prio[20]  # the first copy of the code ranks first
    names = [i for i in range(len(ids)) if ids[i] == 7]
    assert prio[names[-1]] < prio[names[0]]  # a name said again is worth less each time


def test_a_restatement_close_by_is_ranked_with_the_first_copy_and_a_distant_copy_is_not() -> None:
    # 20..24 = a code stated, restated 2 tokens later, and copied again far away; 1..6 = prose
    prose = [1, 2, 3, 4, 5, 6] * 12
    code = [20, 21, 22, 23, 24]
    ids = np.array(prose[:20] + code + [2, 3] + code + prose[:40] + code + prose[40:50])
    sal = np.isin(ids, code)
    near, far = 27, 27 + 5 + 40
    plain = run_priority(ids, sal)
    echoed = run_priority(ids, sal, echo=8)
    assert plain[near] < plain[20] and plain[far] < plain[20]
    assert echoed[near] == echoed[20] == plain[20]  # the restatement takes the statement's rank
    assert echoed[far] == plain[far]  # 40 tokens on, a copy is a copy
    assert np.array_equal(run_priority(ids, sal, echo=0), plain)


def test_echo_marks_flag_the_restatements_that_rank_with_their_statement() -> None:
    prose = [1, 2, 3, 4, 5, 6] * 12
    code = [20, 21, 22, 23, 24]
    ids = np.array(prose[:20] + code + [2, 3] + code + prose[:40] + code + prose[40:50])
    sal = np.isin(ids, code)
    starts, ends = salient_runs(sal)
    assert restated_runs(ids, starts, ends, 8).tolist() == [-1, 0, -1]  # the far copy restates nothing
    assert restated_runs(ids, starts, ends, 0).tolist() == [-1, -1, -1]
    m = echo_marks(ids, sal, 8)
    assert np.flatnonzero(m == ECHO).tolist() == list(range(27, 32))
    assert not echo_marks(ids, sal, 0).any()


def test_restatements_last_hold_every_statement_in_a_small_share() -> None:
    """Three facts (runs of 2 tokens at 10, 40, 70), each restated 4 tokens later; each run
    keeps 2 tokens before it, so a fact costs 4 tokens a statement, 8 with its restatement.
    A share of 14 ranked as the runs rank (a restatement with its statement) loses a fact
    whole; with restatements last it holds the three statements. With room for all, the
    two walks keep the same tokens."""
    n = 100
    ids = np.arange(1000, 1000 + n)  # prose: every token different
    sal = np.zeros(n, bool)
    for a, key in ((10, (50, 51)), (40, (60, 61)), (70, (70, 71))):
        ids[a:a + 2] = ids[a + 4:a + 6] = key
        sal[a:a + 2] = sal[a + 4:a + 6] = True
    prio = run_priority(ids, sal, echo=8)
    marks = echo_marks(ids, sal, 8)
    pos = np.arange(n)

    def kept(cap: int, last: bool) -> set[int]:
        return set(salient_positions(pos, prio, np.zeros(n), before=2, after=0, cap=cap, marks=marks,
                                     echo_last=last).tolist())

    statements = {p for a in (10, 40, 70) for p in range(a - 2, a + 2)}
    assert not statements <= kept(14, last=False)  # a fact is lost whole
    assert statements <= kept(14, last=True)
    assert kept(24, last=True) == kept(24, last=False)  # room for all: the same positions
    assert len(kept(24, last=True)) == 24
