"""A small RULER-style suite, generated locally, scored against the full cache on the same prompts.

RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?") extends the single needle with synthetic tasks whose answers are
exact strings. We generate five of them from any text file (the haystack), at exact
token lengths, with the phrasing of RULER's templates:

* ``niah_single``: one needle, "One of the special magic numbers for {key} is: {value}.",
  asked for by its key (an adjective-noun pair);
* ``niah_multikey``: four needles with different keys; one of them is asked for;
* ``niah_multivalue``: four needles with the same key and different values; all are asked for;
* ``vt`` (variable tracking): a chain ``VAR A = 12345 ... VAR B = VAR A ...`` spread over the
  haystack; asked which variables hold the value;
* ``cwe`` (common-words extraction): a numbered list of words drawn from the haystack's own
  vocabulary, ten of them many times more frequent than the rest; asked for the ten.

Every prompt is a document (instructions, then the context) and a question (which ends
with RULER's answer prefix). Both retrieval protocols run on the very same tokens
(:mod:`.runner`): ``in-prompt`` reads them as one prompt, ``later`` reads the document
(compressed when read) and then feeds the question. A sample's score is its share of the
references found in the greedy answer (RULER's string match; for single answers: the
answer's first number is the value), plus the teacher-forced log-probability of the
reference answer. The full cache answers the same prompts under the same protocol; a
row's ``relative`` is the sum over samples of min(score, full score) over the sum of
the full scores, and ``delta`` is score minus full score, in points.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from spindle_local.eval.needle import EnginePair, NeedleBuilder, key_found

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe")
PROTOCOLS = ("in-prompt", "later")

ADJECTIVES = ("ancient", "bitter", "brave", "calm", "clever", "crooked", "curious", "damp", "eager", "faint",
              "fierce", "gentle", "gloomy", "hollow", "humble", "icy", "jolly", "lazy", "lively", "loud", "mighty",
              "narrow", "nervous", "polite", "proud", "quiet", "rapid", "rusty", "shiny", "silent", "sleepy",
              "steady", "sticky", "tender", "tidy", "vast", "wicked", "wise", "witty", "zealous")
NOUNS = ("anchor", "badger", "balcony", "basket", "beacon", "blanket", "bucket", "cabinet", "candle", "canyon",
         "carpet", "castle", "cupboard", "dolphin", "drawer", "falcon", "feather", "garden", "harbor", "helmet",
         "island", "kettle", "ladder", "lantern", "meadow", "mirror", "orchard", "parrot", "pebble", "pillow",
         "pocket", "river", "saddle", "shelter", "spider", "teapot", "tunnel", "violin", "wagon", "window")

NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.\n")
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = ("What is the special magic number for {key} mentioned in the provided text? "
                 "The special magic number for {key} mentioned in the provided text is ")
NIAH_QUESTION_ALL = ("What are all the special magic numbers for {key} mentioned in the provided text? "
                     "The special magic numbers for {key} mentioned in the provided text are ")
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
VT_QUESTION = ("Question: Find all variables that are assigned the value {value} in the text above. "
               "Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
               "assigned the value {value}, they are:")
CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")
CWE_QUESTION = ("Question: What are the {n} most common words in the above list? "
                "Answer: The top {n} words that appear most often in the list are:")


@dataclass
class RulerPrompt:
    task: str
    document: list[int]
    question: list[int]
    references: list[str]  # the strings the answer must contain
    answer: str  # the reference answer scored under teacher forcing (the references, as an answer would say them)
    max_new: int  # tokens generated for the answer
    single: bool  # one reference: the answer's first number must be it

    @property
    def length(self) -> int:
        return len(self.document) + len(self.question)


def score_answer(text: str, references: Sequence[str], *, single: bool = False) -> float:
    """RULER's string match: the share of ``references`` found in ``text`` (whole words, any case).

    With ``single`` the reference is a number that must be the answer's first number
    (as for the pass key): an answer listing every number of the context does not score.
    """
    if single:
        return float(key_found(text, references[0]))
    found = {w.lower() for w in re.findall(r"[A-Za-z0-9]+", text)}
    return sum(r.lower() in found for r in references) / len(references)


def _number(rng: np.random.Generator, digits: int) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def _distinct(rng: np.random.Generator, n: int, draw: Callable[[], str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        x = draw()
        if x not in out:
            out.append(x)
    return out


class RulerBuilder:
    """Generates the tasks' prompts from a haystack text with one model's tokenizer."""

    def __init__(self, tokenize: Callable[[str], list[int]], piece: Callable[[int], str], haystack: str,
                 *, digits: int = 7, n_needles: int = 4, hops: int = 4, n_common: int = 10):
        self.tokenize = tokenize
        self.digits = digits
        self.n_needles = n_needles
        self.hops = hops
        self.n_common = n_common
        self.hay = NeedleBuilder(tokenize, piece, haystack)
        # The common-words task draws its words from the haystack's own vocabulary.
        self.words = sorted({w.lower() for w in re.findall(r"\b[A-Za-z]{4,10}\b", haystack)})

    def build(self, task: str, length: int, rng: np.random.Generator) -> RulerPrompt:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        return getattr(self, "_" + task)(int(length), rng)

    # -- tasks ---------------------------------------------------------------------------------

    def _key(self, rng: np.random.Generator) -> str:
        return f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}"

    def _with_needles(self, task: str, length: int, intro: str, needles: Sequence[str], question: str,
                      rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """(document, question): ``intro``, the haystack with ``needles`` at random depths (in order), the question."""
        head = self.tokenize(intro)
        ins = [self.tokenize("\n" + s + "\n") for s in needles]
        q = self.tokenize("\n" + question)
        fill = length - len(head) - sum(len(t) for t in ins) - len(q)
        if fill < 16:
            raise ValueError(f"length {length} is too short for the {task} task")
        depths = np.sort(rng.uniform(0.05, 0.95, size=len(ins)))
        doc, _ = self.hay.compose(fill, list(zip(depths, ins)), head=head)
        return doc, q

    def _niah_single(self, length: int, rng: np.random.Generator) -> RulerPrompt:
        key, value = self._key(rng), _number(rng, self.digits)
        doc, q = self._with_needles("niah_single", length, NIAH_INTRO, [NIAH_NEEDLE.format(key=key, value=value)],
                                    NIAH_QUESTION.format(key=key), rng)
        return RulerPrompt("niah_single", doc, q, [value], value, self.digits + 4, True)

    def _niah_multikey(self, length: int, rng: np.random.Generator) -> RulerPrompt:
        keys = _distinct(rng, self.n_needles, lambda: self._key(rng))
        values = _distinct(rng, self.n_needles, lambda: _number(rng, self.digits))
        order = rng.permutation(self.n_needles)
        needles = [NIAH_NEEDLE.format(key=keys[i], value=values[i]) for i in order]
        doc, q = self._with_needles("niah_multikey", length, NIAH_INTRO, needles,
                                    NIAH_QUESTION.format(key=keys[0]), rng)
        return RulerPrompt("niah_multikey", doc, q, [values[0]], values[0], self.digits + 4, True)

    def _niah_multivalue(self, length: int, rng: np.random.Generator) -> RulerPrompt:
        key = self._key(rng)
        values = _distinct(rng, self.n_needles, lambda: _number(rng, self.digits))
        needles = [NIAH_NEEDLE.format(key=key, value=v) for v in values]
        doc, q = self._with_needles("niah_multivalue", length, NIAH_INTRO, needles,
                                    NIAH_QUESTION_ALL.format(key=key), rng)
        return RulerPrompt("niah_multivalue", doc, q, values, ", ".join(values),
                           self.n_needles * (self.digits + 3) + 4, False)

    def _vt(self, length: int, rng: np.random.Generator) -> RulerPrompt:
        letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
        names = _distinct(rng, self.hops + 1, lambda: "".join(rng.choice(letters, 5)))
        value = _number(rng, 5)
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i + 1]} = VAR {names[i]}" for i in range(self.hops)]
        doc, q = self._with_needles("vt", length, VT_INTRO, chain,
                                    VT_QUESTION.format(value=value, n=len(names)), rng)
        return RulerPrompt("vt", doc, q, names, " " + " ".join(names), 4 * len(names) + 8, False)

    def _cwe(self, length: int, rng: np.random.Generator) -> RulerPrompt:
        n = self.n_common
        head = self.tokenize(CWE_INTRO)
        q = self.tokenize("\n" + CWE_QUESTION.format(n=n))
        room = length - len(head) - len(q)
        if len(self.words) < 2 * n:
            raise ValueError(f"the haystack's vocabulary ({len(self.words)} words) is too small for the cwe task")
        # Tokens per list item: first measured on the vocabulary, then on the list itself, so
        # that the list fills the length (a few tokens short at most) and is rarely cut.
        probe = rng.choice(len(self.words), size=min(64, len(self.words)), replace=False)
        per_item = float(np.mean([len(self.tokenize(f"{i + 1}. {self.words[j]}\n")) for i, j in enumerate(probe)]))
        for _ in range(4):
            doc, common, used, total = self._cwe_list(int(room / per_item), head, len(q), length, rng)
            if (used < total and total - used <= max(3, total // 50)) or (
                    used == total and length - len(doc) - len(q) <= 12):
                break
            per_item = (len(doc) - len(head)) / max(used, 1)
        return RulerPrompt("cwe", doc, q, common, " " + ", ".join(common), 4 * n + 8, False)

    def _cwe_list(self, items: int, head: list[int], n_question: int, length: int,
                  rng: np.random.Generator) -> tuple[list[int], list[str], int, int]:
        """(document, common words, items used, items drawn) for a list of about ``items`` words."""
        n = self.n_common
        # RULER's frequencies (30 vs 3) need 4K tokens and more; at any length the common words
        # take about a third of the list and each appears at least four times the others' count.
        rare_count = max(1, items // (10 * n * 4))
        common_count = max(4 * rare_count, int(items * 0.33) // n)
        n_rare = max(0, (items - n * common_count) // rare_count)
        if common_count * n > items or len(self.words) < n + n_rare:
            raise ValueError(f"the length or the haystack's vocabulary ({len(self.words)} words) is too small "
                             f"for the cwe task")
        chosen = [self.words[i] for i in rng.choice(len(self.words), size=n + n_rare, replace=False)]
        common, rare = chosen[:n], chosen[n:]
        seq = np.array(common * common_count + rare * rare_count, dtype=object)
        rng.shuffle(seq)
        doc = list(head)
        for i, w in enumerate(seq):
            t = self.tokenize(f"{i + 1}. {w}\n")
            if len(doc) + len(t) + n_question > length:
                return doc, common, i, len(seq)
            doc += t
        return doc, common, len(seq), len(seq)


def _summarize(rows: list[dict]) -> dict:
    s, f, b = (sum(r[k] * r["n"] for r in rows) for k in ("score", "score_full", "score_both"))
    n = sum(r["n"] for r in rows)
    deltas = [r["logprob_delta"] for r in rows if r["logprob_delta"] is not None]
    return {"n": n, "score": s / n if n else 0.0, "score_full": f / n if n else 0.0,
            "relative": b / f if f else 0.0, "delta": 100.0 * (s - f) / n if n else 0.0,
            "logprob_delta": float(np.mean(deltas)) if deltas else None}


def run_ruler(model_path: str, *, tasks: Sequence[str], lengths: Sequence[int], samples: int, seed: int,
              engine_config, haystack: str, protocols: Sequence[str] = PROTOCOLS,
              progress: Callable[[int, int], None] | None = None, full_results: dict | None = None,
              model=None) -> dict:
    """Every task × protocol × length, ``samples`` prompts each, compressed vs full cache.

    The prompts of a (task, length) are drawn from ``seed`` alone, so every protocol,
    policy and budget sees the same ones. ``full_results`` (a dict the caller keeps)
    caches the full cache's answers by prompt, so a grid of configurations on the same
    haystack pays for the reference once. ``model``: a loaded model to share (left open).
    """
    from spindle_local.eval.runner import Conversation

    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"unknown protocol {p!r}; choose from {', '.join(PROTOCOLS)}")
    rows: list[dict] = []
    full_runs = 0
    total, done = len(tasks) * len(lengths) * samples * len(protocols), 0
    with EnginePair(model_path, engine_config, max(lengths) + 256, model=model) as pair:
        builder = RulerBuilder(pair.tokenize, pair.model.token_to_piece, haystack)
        conv_full = Conversation(pair.full)
        conv = Conversation(pair.comp) if pair.comp is not None else None

        def run(c: Conversation, p: RulerPrompt, protocol: str, ref: list[int]) -> tuple:
            if protocol == "in-prompt":
                turn = c.answer_prompt(p.document + p.question, ref, max_new=p.max_new)
            else:
                c.read(p.document)
                turn = c.ask(p.question, ref, max_new=p.max_new)
            return (score_answer(turn.answer, p.references, single=p.single), turn.logprob,
                    turn.reserve_ratio, c.reserve_ratio_after_document)

        for ti, task in enumerate(tasks):
            for length in lengths:
                rng = np.random.default_rng([seed, TASKS.index(task), int(length)])
                prompts = [builder.build(task, length, rng) for _ in range(samples)]
                for protocol in protocols:
                    acc: dict[str, list] = {k: [] for k in ("s", "sf", "lp", "lpf", "rr", "rd")}
                    for p in prompts:
                        ref = pair.tokenize(p.answer)
                        memo_key = (protocol, tuple(p.document), tuple(p.question), tuple(ref), p.max_new)
                        if full_results is not None and memo_key in full_results:
                            full = full_results[memo_key]
                        else:
                            full = run(conv_full, p, protocol, ref)
                            full_runs += 1
                            if full_results is not None:
                                full_results[memo_key] = full
                        comp = run(conv, p, protocol, ref) if conv is not None else full
                        acc["s"].append(comp[0])
                        acc["sf"].append(full[0])
                        acc["lp"].append(comp[1])
                        acc["lpf"].append(full[1])
                        acc["rr"].append(comp[2] if conv is not None else 1.0)
                        acc["rd"].append(comp[3] if conv is not None else 1.0)
                        done += 1
                        if progress:
                            progress(done, total)
                    pairs = [(a, b) for a, b in zip(acc["lp"], acc["lpf"]) if a is not None and b is not None]
                    rows.append({
                        "task": task, "protocol": protocol, "length": int(length), "n": len(prompts),
                        "tokens": int(np.mean([p.length for p in prompts])),
                        "score": float(np.mean(acc["s"])), "score_full": float(np.mean(acc["sf"])),
                        "score_both": float(np.mean(np.minimum(acc["s"], acc["sf"]))),
                        "logprob": float(np.mean([a for a, _ in pairs])) if pairs else None,
                        "logprob_full": float(np.mean([b for _, b in pairs])) if pairs else None,
                        "logprob_delta": float(np.mean([a - b for a, b in pairs])) if pairs else None,
                        "reserve_ratio": float(np.mean(acc["rr"])),
                        "reserve_ratio_after_document": float(np.mean(acc["rd"])),
                    })
    for r in rows:
        r["relative"] = r["score_both"] / r["score_full"] if r["score_full"] else 0.0
        r["delta"] = 100.0 * (r["score"] - r["score_full"])
    summary = {t: {p: _summarize([r for r in rows if r["task"] == t and r["protocol"] == p]) for p in protocols}
               for t in tasks}
    return {"policy": engine_config.policy, "kv_budget": engine_config.kv_budget, "tasks": list(tasks),
            "protocols": list(protocols), "lengths": [int(n) for n in lengths], "samples": samples, "seed": seed,
            "full_cache_runs": full_runs, "summary": summary, "rows": rows}
