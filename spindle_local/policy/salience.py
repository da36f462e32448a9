"""Salient runs: keep the numbers and names of a text, with the words that introduce them.

A document read before its question is compressed with nothing but its own last queries
to score by, and those ask how the text goes on, not what a later question will look
for. The facts a later question asks about are mostly *specific*: numbers, codes, dates,
names — tokens the model cannot reconstruct from context, unlike the prose around
them. So, independently of any window, every run of salient tokens (a token with a
digit, a capitalised word that does not start a sentence, and every piece of a code in
capitals that the tokenizer splits) is protected together
with the ``before`` tokens that introduce it ("The pass key is", "Alice's number:") and
the ``after`` tokens that close it, in every eviction layer. The protected set is capped
at ``share`` of the layer's slots. When a text has more salient runs than that, the runs
that carry the most information go first. A run's priority is the information its tokens
carry *given the text before them*: ``sum(-log p(token | previous token))`` under a bigram
model of the text read so far, backed off to the token's frequency in the whole text
(:func:`token_information`). It is a cheap stand-in for the model's own surprisal, with
the property that matters: what the text has already said, or keeps saying, is cheap (a
name the text repeats, a copyright line, the second copy of a code stated twice), while a
number or name stated once, unlike anything before it, is expensive to lose — no later
copy or pattern can restore it. A copy of a run a few tokens after it ("K. Remember it.
K is the pass key.") is the exception: the text restates that fact, and a question that
follows may be answered from either statement, so the copy ranks with the first
(``echo``); a copy farther away is a repeat and ranks by its own information. Ties go to
the runs the window attends to most, then the newest.

A run that opens its sentence ("K is the pass key.", "1984 was the year ...") has no
introduction before it: the words that say what it is come after it. Such a run keeps the
tokens after it up to its sentence's end, at most ``opening`` of them, where any other run
keeps ``after`` (:func:`run_tails`). With ``sentence``, the tokens a run keeps before
and after it stay within its sentence, bounded by full stops and line breaks
(:func:`run_heads`): the words that say what a number is are in its own sentence, and
the end of the sentence before it is no part of the fact. Keeping less per run lets the
share hold more facts (three named keys of one template in a 2,000-token document at
0.25, where the wider context holds two). With ``widen``, the share is spent in two
walks over the runs: first each run within its sentence, then, where room is left, each
run again with its unbounded context: every fact first, then the words around them. The
engine marks where sentences open and end (:func:`scan_pieces`, the same scan that
classifies the tokens).

Classification needs token text, which the policy does not have: the engine passes
:func:`salient_tokens` of the token pieces (a plain-Python function, kept here with the
rule it implements). Kernels: :func:`run_positions` (index intervals) / :func:`run_positions_ref` (sets),
:func:`token_information` (vectorised) / :func:`token_information_ref` (a loop).
"""

from __future__ import annotations

import numpy as np

_SENTENCE_END = (".", "!", "?", ":", "\n", '"', "'", ">", "*", "#", "-")


def salient_tokens(pieces: list[str]) -> np.ndarray:
    """bool [n]: which tokens of ``pieces`` (in text order) are salient.

    A piece is salient when it has a digit, when it begins a capitalised word that does
    not follow a sentence end (sentence-initial capitals are not names), or when it
    continues a salient *code*: a word with a digit, or in capitals that the tokenizer cuts
    into pieces of one or two letters (:func:`scan_pieces`).
    """
    return salient_scan(pieces)[0]


OPENS = 1  # sentence marks (:func:`scan_pieces`): the token follows a sentence end
ENDS = 2  # ... the token ends a sentence (any end: ".", ":", a newline, a quote, ...)
STOPS = 4  # ... the token ends a sentence with a full stop, "!", "?" or a line break
NUMERIC = 8  # ... the token is salient and its word so far has a digit ("7", "f" of "x7f")
CODE = 16  # ... the token is salient and its word so far is in capitals ("UHK" of "UHKWG")
ECHO = 32  # ... the token is in a run that restates a run just before it (:func:`echo_marks`)
_STOP = (".", "!", "?")


def _stops(piece: str) -> bool:
    """Does ``piece`` end a sentence with a full stop, "!", "?" or a line break? A line break
    after a colon in the same piece (":\n", a label over its value) does not count."""
    if "\n" in piece:
        return not piece[:piece.rindex("\n")].rstrip().endswith(":")
    return piece.rstrip().endswith(_STOP)


def salient_scan(pieces: list[str], prev_end: bool = True, prev_mark: int = 0) -> tuple[np.ndarray, bool]:
    """:func:`salient_tokens` of ``pieces`` that continue a text, and whether they end a
    sentence: a piece depends only on the pieces before it, through ``prev_end`` (does the
    text so far end a sentence; True at its start) and ``prev_mark`` (the marks of the
    text's last token, :func:`scan_pieces`), so a growing text is classified a part at a
    time."""
    flags, _, prev_end = scan_pieces(pieces, prev_end, prev_mark)
    return flags, prev_end


def _code_piece(piece: str) -> bool:
    """Is ``piece`` one or two capitals (" U", "WG")? A word in capitals that the tokenizer
    can only cut into such pieces is not one it has seen often: a code or a random name.
    A word written in capitals is cut into longer pieces (" PRO", "GRAM")."""
    word = piece.strip()
    return 0 < len(word) <= 2 and word.isupper()


def scan_pieces(pieces: list[str], prev_end: bool = True,
                prev_mark: int = 0) -> tuple[np.ndarray, np.ndarray, bool]:
    """:func:`salient_scan` with each token's marks: uint8 [n], ``OPENS`` when the text
    before the token ends a sentence, ``ENDS`` when the token ends one, and ``STOPS`` too
    when it ends one with a full stop, "!", "?" or a line break (:func:`_stops`);
    ``NUMERIC`` or ``CODE`` when the token is salient and its word so far has a digit, or
    is a code in capitals (pieces of one or two capitals, :func:`_code_piece`).

    A word the tokenizer splits is salient whole when it is such a code: a random name
    (" U", "H", "K", "WG" for "UHKWG") or an identifier ("7", "f" of "x7f") is not something
    the model can complete from its first piece, and a fragment of it names something that
    does not exist. The rest of a natural word (" Keyboard", "Inter", "rupt"; " WAR",
    "RAN", "TY" in a text written in capitals) is not salient: the model spells it from
    its start, and each piece it added to a run would take the room of another fact."""
    out = np.zeros(len(pieces), dtype=bool)
    marks = np.zeros(len(pieces), dtype=np.uint8)
    code = prev_mark & (CODE | NUMERIC)
    for i, piece in enumerate(pieces):
        if prev_end:
            marks[i] |= OPENS
        joins = bool(code) and piece[:1].isalnum()  # no space: the code's word goes on
        digit = any(c.isdigit() for c in piece)
        if digit or joins and (code & NUMERIC or _code_piece(piece)):
            out[i] = True
        else:
            word = piece.lstrip()
            if word[:1].isupper() and not prev_end and piece[:1].isspace():
                out[i] = True  # a capitalised word inside a sentence
        if out[i]:
            if digit or joins and code & NUMERIC:
                marks[i] |= NUMERIC
            elif _code_piece(piece):  # a code's first piece, or the next one of a code in capitals
                marks[i] |= CODE
        code = marks[i] & (CODE | NUMERIC)
        stripped = piece.rstrip(" \t")
        if stripped:
            prev_end = stripped.endswith(_SENTENCE_END) or piece.endswith("\n")
        elif "\n" in piece:
            prev_end = True
        if prev_end and stripped:
            marks[i] |= ENDS
            if _stops(piece):
                marks[i] |= STOPS
    return out, marks, prev_end


def salient_runs(salient: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) indices, inclusive, of the maximal runs of True (non-zero) in ``salient``."""
    s = np.asarray(salient) > 0
    if not s.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    d = np.diff(np.concatenate([[0], s.astype(np.int8), [0]]))
    return np.nonzero(d == 1)[0].astype(np.int64), (np.nonzero(d == -1)[0] - 1).astype(np.int64)


def run_tails(positions: np.ndarray, salient: np.ndarray, marks: np.ndarray | None, after: int,
              opening: int, sentence: bool = False) -> np.ndarray:
    """int [runs]: positions each run of ``salient`` keeps after its end: ``after``, or, for
    a run that opens its sentence (``marks[start] & OPENS``), as far as the first sentence
    end (``ENDS``) within ``opening`` positions after it, when that is farther. With
    ``sentence``, never past the next full stop or line break (``STOPS``; a run that ends
    its sentence keeps 0).

    ``positions`` ascending with ``salient`` and ``marks`` aligned; a sentence end that is
    not among ``positions`` (dropped everywhere) is not seen, and the run keeps ``after``.
    """
    starts, ends = salient_runs(salient)
    tails = np.full(len(starts), int(after), dtype=np.int64)
    if marks is None or len(starts) == 0 or (opening <= 0 and not sentence):
        return tails
    pos, m = np.asarray(positions, np.int64), np.asarray(marks)
    if opening > 0:
        dist = _to_next(pos, m & ENDS, ends)
        use = ((m[starts] & OPENS) > 0) & (dist > 0) & (dist <= opening)
        tails[use] = np.maximum(tails[use], dist[use])
    if sentence:
        dist = _to_next(pos, m & STOPS, ends)
        ok = dist >= 0
        tails[ok] = np.minimum(tails[ok], dist[ok])
    return tails


def _to_next(pos: np.ndarray, marked: np.ndarray, at: np.ndarray) -> np.ndarray:
    """int [len(at)]: positions from each index in ``at`` to the first ``marked`` index at or
    after it (-1: none)."""
    idx = np.nonzero(marked)[0]
    nxt = np.searchsorted(idx, at, side="left")
    ok = nxt < len(idx)
    out = np.full(len(at), -1, dtype=np.int64)
    out[ok] = pos[idx[nxt[ok]]] - pos[at[ok]]
    return out


def run_heads(positions: np.ndarray, salient: np.ndarray, marks: np.ndarray | None, before: int,
              sentence: bool) -> np.ndarray:
    """int [runs]: positions each run of ``salient`` keeps before its start: ``before``, and
    with ``sentence`` never past the last full stop before it (``STOPS``). The words that
    introduce a number or a name are in its own sentence; the ones before it belong to
    another, which the run has no reason to keep. Only full stops and line breaks bound
    it: a colon or a dash often separates a label from its value ("Phone: 555", "the
    number for X is: 48"), which the run must keep."""
    starts, _ = salient_runs(salient)
    heads = np.full(len(starts), int(before), dtype=np.int64)
    if marks is None or not sentence or len(starts) == 0:
        return heads
    pos = np.asarray(positions, np.int64)
    stop_idx = np.nonzero(np.asarray(marks) & STOPS)[0]
    prev = np.searchsorted(stop_idx, starts, side="left") - 1  # last full stop before each start
    ok = prev >= 0
    heads[ok] = np.minimum(heads[ok], pos[starts[ok]] - pos[stop_idx[prev[ok]]] - 1)
    return heads


def _tiers(before: int | np.ndarray, after: int | np.ndarray, n_runs: int) -> tuple[np.ndarray, np.ndarray]:
    """``before`` and ``after`` as int [tiers, runs]: one value for all runs, one per run
    (one tier), or one row per tier."""
    b, a = (np.asarray(x, np.int64) for x in (before, after))
    b, a = (x if x.ndim == 2 else np.broadcast_to(x, (1, n_runs)) for x in (b, a))
    t = max(len(b), len(a))
    return np.broadcast_to(b, (t, n_runs)), np.broadcast_to(a, (t, n_runs))


def _orders(order: np.ndarray | list[np.ndarray], tiers: int) -> list[np.ndarray]:
    """The runs each tier walks: one order for every tier, or one per tier."""
    if isinstance(order, list):
        if len(order) != tiers:
            raise ValueError(f"{len(order)} run orders for {tiers} tiers")
        return [np.asarray(o, np.int64) for o in order]
    return [np.asarray(order, np.int64)] * tiers


def run_positions_ref(positions: np.ndarray, salient: np.ndarray, order: np.ndarray | list[np.ndarray],
                      before: int | np.ndarray, after: int | np.ndarray, cap: int) -> np.ndarray:
    """Numpy reference of :func:`run_positions`: runs in ``order`` (indices into
    :func:`salient_runs`), each widened by ``before`` positions and ``after`` (each one for
    all, or per run: :func:`run_heads`, :func:`run_tails`), taken whole while the union
    stays within ``cap`` (a run that would pass it is skipped). With one row of ``before``
    and ``after`` per tier, the walk over ``order`` repeats tier by tier: a later tier
    widens the runs an earlier one took, where the cap still allows. ``order`` may be a
    list with one order per tier (a tier that walks only some of the runs)."""
    starts, ends = salient_runs(salient)
    heads, tails = _tiers(before, after, len(starts))
    orders = _orders(order, len(heads))
    taken: set[int] = set()
    for t in range(len(heads)):
        for r in orders[t]:
            lo, hi = positions[starts[r]] - heads[t, r], positions[ends[r]] + tails[t, r]
            run = {int(p) for p in positions[(positions >= lo) & (positions <= hi)]}
            if len(taken | run) > cap:
                continue
            taken |= run
    return np.array(sorted(taken), dtype=np.int64)


def run_positions(positions: np.ndarray, salient: np.ndarray, order: np.ndarray | list[np.ndarray],
                  before: int | np.ndarray, after: int | np.ndarray, cap: int) -> np.ndarray:
    """Protected positions (ascending) for the salient runs in ``order``; see the reference.

    Positions are ascending, so a widened run is an index interval (two binary searches);
    the greedy walk over the runs (tier by tier) is a loop of slice operations.
    """
    pos = np.asarray(positions, np.int64)
    starts, ends = salient_runs(salient)
    heads, tails = _tiers(before, after, len(starts))
    orders = _orders(order, len(heads))
    lo = np.concatenate([np.searchsorted(pos, pos[starts[o]] - h[o], side="left") for h, o in zip(heads, orders)])
    hi = np.concatenate([np.searchsorted(pos, pos[ends[o]] + t[o], side="right") for t, o in zip(tails, orders)])
    return pos[greedy_intervals(len(pos), lo, hi, cap)]


def greedy_intervals(n: int, lo: np.ndarray, hi: np.ndarray, cap: int) -> np.ndarray:
    """bool [n]: index intervals ``[lo[i], hi[i])`` taken whole, in order, while the union
    stays within ``cap`` indices (an interval that would pass it is skipped; a later,
    shorter one may still fit)."""
    taken = np.zeros(n, dtype=bool)
    count = 0
    for a, b in zip(lo.tolist(), hi.tolist()):
        if count >= cap:
            break
        need = (b - a) - int(np.count_nonzero(taken[a:b]))
        if need and count + need <= cap:
            taken[a:b] = True
            count += need
    return taken


def _earlier(keys: np.ndarray) -> np.ndarray:
    """int [n]: how many times ``keys[i]`` occurred at indices before ``i``."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    first = np.ones(len(sk), dtype=bool)
    first[1:] = sk[1:] != sk[:-1]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(sk)), 0))
    out = np.empty(len(keys), dtype=np.int64)
    out[order] = np.arange(len(sk)) - group_start
    return out


def token_information(ids: np.ndarray, prior: float = 1.0) -> np.ndarray:
    """float [n]: ``-log p(ids[i] | ids[i-1])`` under the bigram counts of ``ids[:i]``.

    ``p = (c(prev, tok) + prior·u(tok)) / (c(prev) + prior)``, where ``c`` counts earlier
    bigrams only (causal: the first copy of a run is news, the second is not) and
    ``u(tok) = (count(tok) - 1 + 0.5) / n`` is the token's frequency in the rest of the
    text (the back-off before the bigram has been seen; 0.5 keeps a token seen once finite).
    """
    ids = np.asarray(ids, np.int64)
    n = len(ids)
    if n == 0:
        return np.zeros(0)
    _, inv, counts = np.unique(ids, return_inverse=True, return_counts=True)
    u = (counts[inv] - 1 + 0.5) / n
    out = -np.log(u)
    if n > 1:
        vocab = int(inv.max()) + 1
        pair = _earlier(inv[:-1] * vocab + inv[1:])  # earlier copies of the bigram ending at i
        prev = _earlier(inv)[:-1]  # earlier bigrams that start with the previous token
        out[1:] = -np.log((pair + prior * u[1:]) / (prev + prior))
    return out


def token_information_ref(ids: np.ndarray, prior: float = 1.0) -> np.ndarray:
    """Loop reference of :func:`token_information` (dictionaries of counts, token by token)."""
    ids = [int(t) for t in ids]
    n = len(ids)
    total: dict[int, int] = {}
    for t in ids:
        total[t] = total.get(t, 0) + 1
    pairs: dict[tuple[int, int], int] = {}
    starts: dict[int, int] = {}
    out = np.zeros(n)
    for i, t in enumerate(ids):
        u = (total[t] - 1 + 0.5) / n
        if i == 0:
            out[i] = -np.log(u)
            continue
        p = ids[i - 1]
        out[i] = -np.log((pairs.get((p, t), 0) + prior * u) / (starts.get(p, 0) + prior))
        pairs[(p, t)] = pairs.get((p, t), 0) + 1
        starts[p] = starts.get(p, 0) + 1
    return out


def restated_runs(ids: np.ndarray, starts: np.ndarray, ends: np.ndarray, echo: int) -> np.ndarray:
    """int [runs]: for each run (``starts``/``ends``, inclusive, ascending), the latest
    earlier run with the same tokens that ends at most ``echo`` tokens before it starts
    (a restatement of it), or -1."""
    out = np.full(len(starts), -1, dtype=np.int64)
    if echo <= 0:
        return out
    last: dict[tuple[int, ...], tuple[int, int]] = {}  # run tokens -> (end, index) of its latest copy
    for r, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        key = tuple(ids[s:e + 1].tolist())
        prev = last.get(key)
        if prev is not None and s - prev[0] <= echo:
            out[r] = prev[1]
        last[key] = (e, r)
    return out


def run_priority(ids: np.ndarray, salient: np.ndarray, echo: int = 0) -> np.ndarray:
    """float [n]: each salient token's run priority (the summed :func:`token_information`
    of its run, module docstring); 0 where not salient.

    ``echo``: a run that repeats the tokens of a run ending at most ``echo`` tokens before
    it is a restatement of the same fact ("K. Remember it. K is ...") and takes that run's
    priority, so the two are ranked together; a copy farther away keeps its own (low)
    priority, as a name the text keeps repeating should."""
    ids = np.asarray(ids, np.int64)
    out = np.zeros(len(ids))
    starts, ends = salient_runs(salient)
    if len(starts) == 0:
        return out
    info = np.concatenate([[0.0], np.cumsum(token_information(ids))])
    prio = info[ends + 1] - info[starts]
    for r, src in enumerate(restated_runs(ids, starts, ends, echo).tolist()):
        if src >= 0:  # sources come first: their priority is final
            prio[r] = max(prio[r], prio[src])
    for s, e, p in zip(starts.tolist(), ends.tolist(), prio.tolist()):
        out[s:e + 1] = p
    return out


def echo_marks(ids: np.ndarray, salient: np.ndarray, echo: int) -> np.ndarray:
    """uint8 [n]: ``ECHO`` on the tokens of every run that restates a run ending at most
    ``echo`` tokens before it (:func:`restated_runs`), 0 elsewhere."""
    ids = np.asarray(ids, np.int64)
    out = np.zeros(len(ids), dtype=np.uint8)
    starts, ends = salient_runs(salient)
    for s, e, src in zip(starts.tolist(), ends.tolist(), restated_runs(ids, starts, ends, echo).tolist()):
        if src >= 0:
            out[s:e + 1] = ECHO
    return out


def run_order(positions: np.ndarray, salient: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """Runs by priority (the largest value of ``salient`` in the run; all equal for a bool
    mask), then the largest window attention any of their tokens gets, then newest first."""
    starts, ends = salient_runs(np.asarray(salient) > 0)
    if len(starts) == 0:
        return np.zeros(0, np.int64)
    prio = np.asarray(salient, np.float64)
    rank = np.array([prio[s:e + 1].max() for s, e in zip(starts, ends)])
    best = np.array([strength[s:e + 1].max() for s, e in zip(starts, ends)])
    return np.lexsort((-np.asarray(positions)[starts], -best, -rank)).astype(np.int64)


def salient_positions(positions: np.ndarray, salient: np.ndarray, strength: np.ndarray, *,
                      before: int, after: int, cap: int, marks: np.ndarray | None = None,
                      opening: int = 0, sentence: bool = False, widen: bool = False,
                      echo_last: bool = False) -> np.ndarray:
    """Positions to protect: salient runs with their context, at most ``cap`` of them.

    ``positions`` ascending with ``salient`` (bool, or :func:`run_priority`),
    ``strength`` (per position, e.g. the best window attention share any head gives it)
    and ``marks`` (sentence marks, or None: unknown) aligned to it; ``opening`` and
    ``sentence``: see :func:`run_tails` and :func:`run_heads`. ``widen`` (with
    ``sentence``): once the runs hold their context within their sentence, a second walk
    in the same order widens them to the context they keep without that bound, while
    ``cap`` allows. ``echo_last``: the runs ``marks`` flag as restatements (``ECHO``) are
    walked after every other run, before any run widens: a fact held once comes before a
    fact held twice, so that a share too small for every statement and its restatement
    still holds every statement.
    """
    if cap <= 0 or len(positions) == 0:
        return np.zeros(0, np.int64)
    order = run_order(positions, salient, strength)
    if len(order) == 0:
        return np.zeros(0, np.int64)
    heads = run_heads(positions, salient, marks, before, sentence)
    tails = run_tails(positions, salient, marks, after, opening, sentence)
    wide = sentence and widen and marks is not None
    if wide:
        heads = np.stack([heads, run_heads(positions, salient, marks, before, False)])
        tails = np.stack([tails, run_tails(positions, salient, marks, after, opening, False)])
    if not (echo_last and marks is not None):
        return run_positions(positions, salient, order, heads, tails, cap)
    starts, _ = salient_runs(np.asarray(salient) > 0)
    again = (np.asarray(marks)[starts[order]] & ECHO) > 0
    heads, tails = _tiers(heads, tails, len(starts))
    rows = [0, 0, 1] if wide else [0, 0]  # statements, then restatements, in their own context; then wide
    orders = [order[~again], order[again]] + ([order] if wide else [])
    return run_positions(positions, salient, orders, heads[rows], tails[rows], cap)
