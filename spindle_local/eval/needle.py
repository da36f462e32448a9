"""Pass-key retrieval in completion form (needle in a haystack), under both retrieval protocols.

A random key is stated once inside long filler text; at the end the prompt asks for it
and the model continues. We build prompts at the token level so lengths are exact:
``[BOS] haystack[:a] needle haystack[a:b] question``, where the needle goes in at a line
break near ``depth`` and the question ends with a space ("The pass key is "): after
"is" SmolLM2's first token is otherwise a near tie between a space and " the"
(DESIGN.md section 5).

Protocols (DESIGN.md section 5, "Two retrieval protocols"; :mod:`.runner`):

* ``in-prompt``: haystack and question are one prompt (the end-of-prompt plan sees the
  question);
* ``later``: the very same tokens, but the haystack is one prompt, compressed when it
  has been read, and the question is a second feed — what ``chat --file`` does;
* ``multi``: one needle per depth in one document, each with a name ("the pass key for
  Maria"), read once; the questions are asked one after another in the same
  conversation (each answer stays in it), in a random order, without re-reading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

DEFAULT_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
DEFAULT_QUESTION = "What is the pass key? The pass key is "
# The multi-question protocol tells its needles apart by a name.
DEFAULT_NAMED_NEEDLE = "The pass key for {name} is {key}. Remember it. {key} is the pass key for {name}."
DEFAULT_NAMED_QUESTION = "What is the pass key for {name}? The pass key for {name} is "
NAMES = ("Maria", "Oliver", "Priya", "Tomas", "Yuki", "Amara", "Lukas", "Sofia", "Mateo", "Ingrid", "Kwame", "Elena",
         "Ravi", "Hana", "Diego", "Freya", "Omar", "Lena", "Chen", "Nadia")
PROTOCOLS = ("in-prompt", "later", "multi")


@dataclass
class NeedlePrompt:
    tokens: list[int]
    key: str
    length: int
    depth: float
    needle_start: int  # token index where the needle begins
    question_start: int = -1  # token index where the question begins (tokens[:question_start] is the document)

    @property
    def document(self) -> list[int]:
        return self.tokens[:self.question_start]

    @property
    def question(self) -> list[int]:
        return self.tokens[self.question_start:]


@dataclass
class MultiNeedlePrompt:
    """One document with a named needle per depth, and one question per needle (in document order)."""

    document: list[int]
    questions: list[list[int]]
    keys: list[str]
    names: list[str]
    depths: list[float]
    needle_starts: list[int]
    length: int  # document plus the first question, comparable with a single-needle prompt's length
    order: list[int] = field(default_factory=list)  # the order the questions are asked in


class NeedleBuilder:
    """Builds pass-key prompts from a haystack text with one model's tokenizer."""

    def __init__(self, tokenize: Callable[..., list[int]], piece: Callable[[int], str], haystack: str,
                 *, needle: str = DEFAULT_NEEDLE, question: str = DEFAULT_QUESTION, bos: Sequence[int] = ()):
        if "{key}" not in needle:
            raise ValueError("the needle template must contain {key}")
        self.tokenize = tokenize
        self.needle = needle
        self.question = question
        self.bos = list(bos)
        self.hay = tokenize(haystack)
        # Token indices where a line starts: natural places to put the needle.
        self.breaks = np.array([i for i, t in enumerate(self.hay) if piece(t).startswith("\n") or
                                piece(t).endswith("\n")], dtype=np.int64) + 1

    def compose(self, fill: int, inserts: Sequence[tuple[float, list[int]]], *,
                head: Sequence[int] = ()) -> tuple[list[int], list[int]]:
        """``BOS head haystack[:fill]`` with each insert at the line break nearest its depth.

        Returns the tokens and where each insert starts (in the order given). Inserts that
        land on the same break follow each other in the order given.
        """
        if fill < 16:
            raise ValueError(f"the prompt is too short for its needles and question ({fill} tokens of filler)")
        if fill > len(self.hay):
            raise ValueError(f"the haystack holds {len(self.hay)} tokens, fewer than the {fill} needed")
        ok = self.breaks[self.breaks <= fill]
        ats = []
        for depth, _ in inserts:
            target = int(round(depth * fill))
            ats.append(int(ok[np.argmin(np.abs(ok - target))]) if len(ok) else target)
        toks = self.bos + list(head)
        starts = [0] * len(inserts)
        prev = 0
        for i in sorted(range(len(inserts)), key=lambda i: (ats[i], i)):
            toks += self.hay[prev:ats[i]]
            starts[i] = len(toks)
            toks += inserts[i][1]
            prev = ats[i]
        toks += self.hay[prev:fill]
        return toks, starts

    def build(self, length: int, depth: float, key: str) -> NeedlePrompt:
        needle = self.tokenize("\n" + self.needle.format(key=key) + "\n")
        question = self.tokenize("\n" + self.question)
        fill = length - len(self.bos) - len(needle) - len(question)
        if fill < 16:
            raise ValueError(f"length {length} is too short for the needle and the question")
        doc, (start,) = self.compose(fill, [(depth, needle)])
        toks = doc + question
        return NeedlePrompt(tokens=toks, key=key, length=len(toks), depth=depth, needle_start=start,
                            question_start=len(doc))

    def build_multi(self, length: int, depths: Sequence[float], keys: Sequence[str],
                    names: Sequence[str]) -> MultiNeedlePrompt:
        """A document with the named needle ``names[i]: keys[i]`` near ``depths[i]``, and its questions."""
        if "{name}" not in self.needle or "{name}" not in self.question:
            raise ValueError("the multi-question protocol needs {name} in the needle and the question")
        needles = [self.tokenize("\n" + self.needle.format(key=k, name=n) + "\n") for k, n in zip(keys, names)]
        questions = [self.tokenize("\n" + self.question.format(name=n)) for n in names]
        fill = length - len(self.bos) - sum(len(t) for t in needles) - len(questions[0])
        if fill < 16:
            raise ValueError(f"length {length} is too short for {len(needles)} needles and a question")
        doc, starts = self.compose(fill, list(zip(depths, needles)))
        return MultiNeedlePrompt(document=doc, questions=questions, keys=list(keys), names=list(names),
                                 depths=[float(d) for d in depths], needle_starts=starts,
                                 length=len(doc) + len(questions[0]))


def random_key(rng: np.random.Generator, digits: int = 5) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def draw_multi(builder: NeedleBuilder, rng: np.random.Generator, length: int,
               depths: Sequence[float]) -> MultiNeedlePrompt:
    """One multi-question prompt: a key and a name per depth, asked in a random order. The
    draws of ``eval needle --protocol multi`` are these, taken in turn from one generator."""
    keys = [random_key(rng) for _ in depths]
    names = [NAMES[i] for i in rng.permutation(len(NAMES))[:len(depths)]]
    p = builder.build_multi(int(length), depths, keys, names)
    p.order = [int(i) for i in rng.permutation(len(depths))]
    return p


def key_found(answer: str, key: str) -> bool:
    """True when the first number in the answer is the key."""
    digits = ""
    for ch in answer:
        if ch.isdigit():
            digits += ch
        elif digits:
            break
    return digits == key


class EnginePair:
    """The full-cache reference and the compressed engine on one loaded model (an evaluation's set-up).

    ``comp`` is None when the configuration is the full f16 cache itself (llama.cpp's quantized
    caches, ``--policy full --set cache_type=q4_0``, are measured against f16). ``longest`` sizes the
    reference's cache (every prompt, question, scored answer and generated token).
    ``model``: an already loaded model to share (a grid of configurations loads it once);
    the pair then leaves it open.
    """

    def __init__(self, model_path: str, engine_config, longest: int, model=None):
        from dataclasses import replace

        from spindle_local.runtime.engine import Engine, EngineConfig

        self.owns_model = model is None
        self.model = engine_config.load_model(model_path) if model is None else model
        self.full = self.comp = None
        try:
            self.full = Engine(model_path, EngineConfig(policy="full", n_cells=longest, max_tokens=longest,
                                                        n_threads=engine_config.n_threads,
                                                        flash_attn=engine_config.flash_attn), model=self.model)
            if engine_config.policy != "full" or engine_config.cache_type != "f16":
                self.comp = Engine(model_path, replace(engine_config), model=self.model)
        except BaseException:
            self.close()
            raise

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_special=False)

    def close(self) -> None:
        for eng in (self.comp, self.full):
            if eng is not None:
                eng.ctx.close()
        self.comp = self.full = None
        if self.owns_model:
            self.model.close()

    def __enter__(self) -> EnginePair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _memo_value(v) -> dict:
    """A full-cache memo entry: {"ok", "logprob"}; older callers kept a bare bool."""
    return v if isinstance(v, dict) else {"ok": bool(v), "logprob": None}


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(np.mean(vals)) if vals else None


def _new_cell(length: int, depth: float) -> dict:
    return {"length": int(length), "depth": float(depth), "n": 0, "correct": 0, "correct_full": 0, "correct_both": 0,
            "_lp": [], "_lp_full": []}


def _add(cell: dict, ok: bool, ok_full: bool, lp: float | None, lp_full: float | None) -> None:
    cell["n"] += 1
    cell["correct"] += int(ok)
    cell["correct_full"] += int(ok_full)
    cell["correct_both"] += int(ok and ok_full)
    cell["_lp"].append(lp)
    cell["_lp_full"].append(lp_full)


def _close_cell(cell: dict) -> dict:
    lp, lpf = cell.pop("_lp"), cell.pop("_lp_full")
    cell["logprob"] = _mean(lp)
    cell["logprob_full"] = _mean(lpf)
    both = [(a, b) for a, b in zip(lp, lpf) if a is not None and b is not None]
    cell["logprob_delta"] = float(np.mean([a - b for a, b in both])) if both else None
    cell["logprob_n"] = len(both)  # prompts where both runs could score the key (runner.answer_logprob)
    return cell


def run_needle(model_path: str, *, lengths: Sequence[int] = (), depths: Sequence[float] = (), samples: int,
               seed: int, engine_config, haystack: str, needle: str | None = None, question: str | None = None,
               protocol: str = "in-prompt", progress: Callable[[int, int], None] | None = None,
               full_results: dict | None = None, max_new: int = 8,
               cells: Sequence[tuple[int, float]] | None = None, model=None) -> dict:
    """Pass-key grid: the compressed engine and the full cache on the very same prompts.

    ``relative_accuracy`` is the share of the full cache's successes that the compressed
    run also gets right (prompts the full cache fails are not held against the policy).
    ``full_results`` (a dict the caller keeps) caches the full cache's answers across
    calls with the same seed, so a grid of policies pays for the reference once.
    ``protocol`` is ``in-prompt``, ``later`` or ``multi`` (module docstring); ``in-prompt``
    and ``later`` draw the same keys and build the same tokens for the same seed. With
    ``multi``, ``depths`` are the needles of one document and each cell is one needle's
    depth; ``turns`` gives the accuracy by the order the questions were asked in.
    ``needle`` / ``question`` default to the protocol's templates (``multi``'s carry {name}).
    ``reserve_ratio_after_document`` is measured when the document has been read (with
    ``in-prompt``: the whole prompt); ``reserve_ratio`` after the (last) answer.
    ``cells``: (length, depth) pairs run instead of ``lengths`` × ``depths`` (not with
    ``multi``). Keys are drawn cell after cell, ``samples`` per cell, in the order run: the
    product in its order gives the very prompts of ``lengths`` × ``depths``.
    ``model``: a loaded model to share (left open).
    """
    from spindle_local.eval.runner import Conversation

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    multi = protocol == "multi"
    needle = needle or (DEFAULT_NAMED_NEEDLE if multi else DEFAULT_NEEDLE)
    question = question or (DEFAULT_NAMED_QUESTION if multi else DEFAULT_QUESTION)
    if multi and len(depths) > len(NAMES):
        raise ValueError(f"the multi-question protocol takes at most {len(NAMES)} depths")
    if cells is not None:
        if multi:
            raise ValueError("cells are for the in-prompt and later protocols (multi puts every depth in one document)")
        plan = [(int(n), float(d)) for n, d in cells]
    else:
        plan = [(int(n), float(d)) for n in lengths for d in depths]
    if not plan:
        raise ValueError("no cells to run")
    n_q = len(depths) if multi else 1
    longest = max(n for n, _ in plan) + 16 + n_q * (96 + max_new)
    with EnginePair(model_path, engine_config, longest, model=model) as pair:
        full, comp = pair.full, pair.comp
        builder = NeedleBuilder(pair.tokenize, pair.model.token_to_piece, haystack, needle=needle, question=question)
        rng = np.random.default_rng(seed)
        conv_full = Conversation(full)
        conv = Conversation(comp) if comp is not None else None
        results: list[dict] = []
        ratios, doc_ratios, q_prefill = [], [], []
        turns = [{"turn": i + 1, "n": 0, "correct": 0, "correct_full": 0, "correct_both": 0} for i in range(n_q)]
        total = len(lengths) * samples if multi else len(plan) * samples
        done = full_runs = 0

        def tick() -> None:
            nonlocal done
            done += 1
            if progress:
                progress(done, total)

        for length in (lengths if multi else ()):
            row = {float(d): _new_cell(length, d) for d in depths}
            for _ in range(samples):
                p = draw_multi(builder, rng, int(length), depths)
                keys, names = p.keys, p.names
                memo_key = ("multi", int(length), tuple(float(d) for d in depths), tuple(keys), tuple(names))
                if full_results is not None and memo_key in full_results:
                    ref = full_results[memo_key]
                else:
                    ref = [vars(t) for t in converse(conv_full, p, pair.tokenize, max_new)]
                    ref = [{"ok": key_found(t["answer"], p.keys[i]), "logprob": t["logprob"]}
                           for i, t in zip(p.order, ref)]
                    full_runs += 1
                    if full_results is not None:
                        full_results[memo_key] = ref
                if conv is None:
                    got = [dict(r) for r in ref]
                    ratios.append(1.0)
                    doc_ratios.append(1.0)
                else:
                    ts = converse(conv, p, pair.tokenize, max_new)
                    got = [{"ok": key_found(t.answer, p.keys[i]), "logprob": t.logprob} for i, t in zip(p.order, ts)]
                    ratios.append(ts[-1].reserve_ratio)
                    doc_ratios.append(conv.reserve_ratio_after_document)
                    q_prefill += [t.prefilled - len(p.questions[i]) for i, t in zip(p.order, ts)]
                for turn, (i, g, r) in enumerate(zip(p.order, got, ref)):
                    _add(row[float(depths[i])], g["ok"], r["ok"], g["logprob"], r["logprob"])
                    t = turns[turn]
                    t["n"] += 1
                    t["correct"] += int(g["ok"])
                    t["correct_full"] += int(r["ok"])
                    t["correct_both"] += int(g["ok"] and r["ok"])
                tick()
            results += [_close_cell(row[float(d)]) for d in depths]
        for length, depth in ([] if multi else plan):
            cell = _new_cell(length, depth)
            for _ in range(samples):
                p = builder.build(int(length), float(depth), random_key(rng))
                ref_tokens = pair.tokenize(p.key)
                memo_key = (int(length), float(depth), p.key)
                if protocol == "later":
                    memo_key = ("later", *memo_key)
                if full_results is not None and memo_key in full_results:
                    ref = _memo_value(full_results[memo_key])
                else:
                    t = _ask(conv_full, p, protocol, ref_tokens, max_new)
                    ref = {"ok": key_found(t.answer, p.key), "logprob": t.logprob}
                    full_runs += 1
                    if full_results is not None:
                        full_results[memo_key] = ref
                if conv is None:
                    got = ref
                    ratios.append(1.0)
                    doc_ratios.append(1.0)
                else:
                    t = _ask(conv, p, protocol, ref_tokens, max_new)
                    got = {"ok": key_found(t.answer, p.key), "logprob": t.logprob}
                    ratios.append(t.reserve_ratio)
                    doc_ratios.append(conv.reserve_ratio_after_document)
                    if protocol == "later":
                        q_prefill.append(t.prefilled - len(p.question))
                _add(cell, got["ok"], ref["ok"], got["logprob"], ref["logprob"])
                tick()
            results.append(_close_cell(cell))
    cells = results
    n = sum(c["n"] for c in cells)
    correct = sum(c["correct"] for c in cells)
    correct_full = sum(c["correct_full"] for c in cells)
    both = sum(c["correct_both"] for c in cells)
    scored = sum(c["logprob_n"] for c in cells)
    delta = sum(c["logprob_delta"] * c["logprob_n"] for c in cells if c["logprob_n"]) / scored if scored else None
    out = {
        "policy": engine_config.policy,
        "kv_budget": engine_config.kv_budget,
        "protocol": protocol,
        "reserve_ratio": float(np.mean(ratios)) if ratios else 1.0,
        "reserve_ratio_max": float(np.max(ratios)) if ratios else 1.0,
        "reserve_ratio_after_document": float(np.mean(doc_ratios)) if doc_ratios else 1.0,
        "accuracy": correct / n if n else 0.0,
        "accuracy_full": correct_full / n if n else 0.0,
        "relative_accuracy": both / correct_full if correct_full else 0.0,
        "logprob": _mean([c["logprob"] for c in cells]),
        "logprob_full": _mean([c["logprob_full"] for c in cells]),
        "logprob_delta": delta,  # mean over the prompts both runs scored
        "logprob_n": int(scored),
        "samples": samples,
        "seed": seed,
        "full_cache_runs": full_runs,  # prompts the full cache answered in this call (the rest: full_results)
        "cells": cells,
    }
    if protocol != "in-prompt":
        # Tokens a question's feed prefilled beyond the question itself: 0 when nothing is re-read.
        out["question_reread_tokens"] = int(max(q_prefill)) if q_prefill else 0
    if multi:
        for t in turns:
            t["relative_accuracy"] = t["correct_both"] / t["correct_full"] if t["correct_full"] else 0.0
        out["turns"] = turns
    return out


def _ask(conv, p: NeedlePrompt, protocol: str, reference: list[int], max_new: int):
    if protocol == "in-prompt":
        return conv.answer_prompt(p.tokens, reference, max_new=max_new)
    conv.read(p.document)
    return conv.ask(p.question, reference, max_new=max_new)


def converse(conv, p: MultiNeedlePrompt, tokenize, max_new: int) -> list:
    """Read ``p``'s document once, then ask its questions in ``p.order``; the turns in that order."""
    conv.read(p.document)
    return [conv.ask(p.questions[i], tokenize(p.keys[i]), max_new=max_new) for i in p.order]
