"""Pass-key retrieval in completion form (needle in a haystack).

A random key is stated once inside long filler text; at the end the prompt asks for it
and the model continues. We build prompts at the token level so lengths are exact:
``[BOS] haystack[:a] needle haystack[a:b] question``, where the needle goes in at a line
break near ``depth`` and the question ends with a space ("The pass key is "): after
"is" SmolLM2's first token is otherwise a near tie between a space and " the"
(DESIGN.md section 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

DEFAULT_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
DEFAULT_QUESTION = "What is the pass key? The pass key is "


@dataclass
class NeedlePrompt:
    tokens: list[int]
    key: str
    length: int
    depth: float
    needle_start: int  # token index where the needle begins


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

    def build(self, length: int, depth: float, key: str) -> NeedlePrompt:
        needle = self.tokenize("\n" + self.needle.format(key=key) + "\n")
        question = self.tokenize("\n" + self.question)
        fill = length - len(self.bos) - len(needle) - len(question)
        if fill < 16:
            raise ValueError(f"length {length} is too short for the needle and the question")
        if fill > len(self.hay):
            raise ValueError(f"the haystack holds {len(self.hay)} tokens, fewer than the {fill} needed")
        target = int(round(depth * fill))
        ok = self.breaks[self.breaks <= fill]
        at = int(ok[np.argmin(np.abs(ok - target))]) if len(ok) else target
        toks = self.bos + self.hay[:at] + needle + self.hay[at:fill] + question
        return NeedlePrompt(tokens=toks, key=key, length=len(toks), depth=depth, needle_start=len(self.bos) + at)


def random_key(rng: np.random.Generator, digits: int = 5) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def key_found(answer: str, key: str) -> bool:
    """True when the first number in the answer is the key."""
    digits = ""
    for ch in answer:
        if ch.isdigit():
            digits += ch
        elif digits:
            break
    return digits == key
