"""Running prompts through an engine for evaluation: greedy answers, teacher-forced scores, conversations.

Two retrieval protocols (DESIGN.md section 5) run through the same code:

* *question in prompt*: :func:`greedy_answer` — reset, read document and question as one
  prompt (the end-of-prompt plan sees the question), answer;
* *question later*: :class:`Conversation` — reset, read the document as one prompt (the
  engine compresses when it has been read, as ``chat --file`` does), then feed each
  question as a prompt of its own after what the engine holds, answer, and go on: later
  questions only add their own tokens, nothing is re-read.

Each answer is scored two ways: the greedy continuation (text) and the teacher-forced
log-probability of the reference answer's tokens (:func:`answer_logprob`), which is
steadier than a pass/fail and measured without changing what the engine holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from spindle_local.runtime.chat_template import Detokenizer, eog_tokens
from spindle_local.runtime.engine import Engine, Sampler


def greedy_continue(engine: Engine, logits: np.ndarray, *, max_new: int = 8) -> str:
    """The greedy continuation from ``logits`` (the engine's state after its last feed), as text.

    The generated tokens stay in the engine (as in a chat, the answer becomes part of the
    conversation); an end-of-generation token stops it and is not fed.
    """
    detok = Detokenizer(engine.model)
    out = []
    for tok in engine.generate(logits, max_tokens=max_new, sampler=Sampler(temperature=0.0),
                               stop=eog_tokens(engine.model)):
        out.append(detok.push(tok))
    out.append(detok.flush())
    return "".join(out)


def greedy_answer(engine: Engine, tokens: Sequence[int], *, max_new: int = 8) -> str:
    """Reset ``engine``, read ``tokens``, and return the greedy continuation as text."""
    engine.reset()
    logits = engine.feed(tokens)
    return greedy_continue(engine, logits, max_new=max_new)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def answer_logprob(engine: Engine, logits: np.ndarray, answer: Sequence[int]) -> float | None:
    """Teacher-forced log-probability (nats) of ``answer`` after the engine's state, which ends unchanged.

    ``logits`` are the next-token logits of that state (what the last feed returned). The
    answer's tokens but the last are fed, their logits read, and then taken back out of
    the regular cache, with the window queries and counters restored. A compression must
    not happen in between — its plan would see the answer — so when the answer's tokens
    would trigger one (the regular part is at its allowance) nothing is fed and the
    result is None.
    """
    answer = [int(t) for t in answer]
    if not answer:
        return None
    lp = float(_log_softmax(logits)[answer[0]])
    rest = answer[:-1]
    if not rest:
        return lp
    if engine.config.policy != "full" and engine._compress_due(len(rest)):
        return None
    n = engine.n_past
    saved_q = engine.queries.snapshot()
    s = engine.stats
    saved = (s.tokens_prefilled, s.prefill_seconds, s.compressions)
    rows = engine.feed(rest, all_logits=True)
    if engine.stats.compressions != saved[2] or not engine.truncate(n):
        raise RuntimeError("internal: scoring the answer compressed the cache")  # _compress_due said it would not
    engine.queries.restore(*saved_q)
    s.tokens_prefilled, s.prefill_seconds = saved[0], saved[1]
    engine.ctx.restore_logits(logits)
    lps = _log_softmax(rows)
    return lp + float(sum(lps[i, answer[i + 1]] for i in range(len(rest))))


@dataclass
class Turn:
    """One question asked and answered."""

    answer: str
    logprob: float | None  # teacher-forced log-probability of the reference answer (None: not measurable)
    prefilled: int  # tokens the question's feed prefilled (only the question's, when nothing is re-read)
    reserve_ratio: float  # after the answer


@dataclass
class Conversation:
    """A document read once, then questions asked one after another without re-reading it."""

    engine: Engine
    document_tokens: int = 0
    reserve_ratio_after_document: float = 1.0
    compressions_after_document: int = 0
    turns: list[Turn] = field(default_factory=list)

    def read(self, document: Sequence[int]) -> np.ndarray:
        """Reset the engine and read ``document`` as one prompt (compressed when read); return the logits."""
        self.engine.reset()
        self.turns = []
        logits = self.engine.feed(document)
        s = self.engine.refresh_stats()
        self.document_tokens = len(document)
        self.reserve_ratio_after_document = s.reserve_ratio
        self.compressions_after_document = s.compressions
        return logits

    def ask(self, question: Sequence[int], reference: Sequence[int] = (), *, max_new: int = 8) -> Turn:
        """Feed ``question`` after what the engine holds, score ``reference``, answer greedily."""
        before = self.engine.stats.tokens_prefilled
        logits = self.engine.feed(question)
        prefilled = self.engine.stats.tokens_prefilled - before
        return self._answer(logits, reference, max_new=max_new, prefilled=prefilled)

    def answer_prompt(self, prompt: Sequence[int], reference: Sequence[int] = (), *, max_new: int = 8) -> Turn:
        """Question in prompt: reset, read document and question as one prompt, answer."""
        logits = self.read(prompt)
        return self._answer(logits, reference, max_new=max_new, prefilled=len(prompt))

    def _answer(self, logits: np.ndarray, reference: Sequence[int], *, max_new: int, prefilled: int) -> Turn:
        lp = answer_logprob(self.engine, logits, reference) if len(reference) else None
        text = greedy_continue(self.engine, logits, max_new=max_new)
        turn = Turn(answer=text, logprob=lp, prefilled=prefilled,
                    reserve_ratio=self.engine.refresh_stats().reserve_ratio)
        self.turns.append(turn)
        return turn
