"""Running prompts through an engine for evaluation: greedy answers, fresh state each time."""

from __future__ import annotations

from typing import Sequence

from spindle_local.runtime.chat_template import Detokenizer, eog_tokens
from spindle_local.runtime.engine import Engine, Sampler


def greedy_answer(engine: Engine, tokens: Sequence[int], *, max_new: int = 8) -> str:
    """Reset ``engine``, read ``tokens``, and return the greedy continuation as text."""
    engine.reset()
    logits = engine.feed(tokens)
    detok = Detokenizer(engine.model)
    out = []
    for tok in engine.generate(logits, max_tokens=max_new, sampler=Sampler(temperature=0.0),
                               stop=eog_tokens(engine.model)):
        out.append(detok.push(tok))
    out.append(detok.flush())
    return "".join(out)
