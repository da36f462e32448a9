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


def run_needle(model_path: str, *, lengths: Sequence[int], depths: Sequence[float], samples: int, seed: int,
               engine_config, haystack: str, needle: str = DEFAULT_NEEDLE, question: str = DEFAULT_QUESTION,
               progress: Callable[[int, int], None] | None = None, full_results: dict | None = None) -> dict:
    """Pass-key grid: the compressed engine and the full cache on the very same prompts.

    ``relative_accuracy`` is the share of the full cache's successes that the compressed
    run also gets right (prompts the full cache fails are not held against the policy).
    ``full_results`` (a dict the caller keeps) caches the full cache's answers across
    calls with the same seed, so a grid of policies pays for the reference once.
    """
    from dataclasses import replace

    from spindle_local.eval.runner import greedy_answer
    from spindle_local.runtime.engine import Engine, EngineConfig
    from spindle_local.runtime.lowlevel import LlamaModel

    model = LlamaModel(model_path)
    longest = max(lengths) + 16
    full = Engine(model_path, EngineConfig(policy="full", n_cells=longest, max_tokens=longest,
                                           n_threads=engine_config.n_threads, flash_attn=engine_config.flash_attn),
                  model=model)
    comp = None if engine_config.policy == "full" else Engine(model_path, replace(engine_config), model=model)
    try:
        builder = NeedleBuilder(lambda t: model.tokenize(t, add_special=False), model.token_to_piece, haystack,
                                needle=needle, question=question)
        rng = np.random.default_rng(seed)
        cells, ratios = [], []
        total, done = len(lengths) * len(depths) * samples, 0
        for length in lengths:
            for depth in depths:
                cell = {"length": int(length), "depth": float(depth), "n": 0, "correct": 0, "correct_full": 0,
                        "correct_both": 0}
                for _ in range(samples):
                    p = builder.build(int(length), float(depth), random_key(rng))
                    memo_key = (int(length), float(depth), p.key)
                    if full_results is not None and memo_key in full_results:
                        ok_full = full_results[memo_key]
                    else:
                        ok_full = key_found(greedy_answer(full, p.tokens), p.key)
                        if full_results is not None:
                            full_results[memo_key] = ok_full
                    if comp is None:
                        ok = ok_full
                        ratios.append(1.0)
                    else:
                        ok = key_found(greedy_answer(comp, p.tokens), p.key)
                        ratios.append(comp.refresh_stats().reserve_ratio)
                    cell["n"] += 1
                    cell["correct"] += int(ok)
                    cell["correct_full"] += int(ok_full)
                    cell["correct_both"] += int(ok and ok_full)
                    done += 1
                    if progress:
                        progress(done, total)
                cells.append(cell)
        n = sum(c["n"] for c in cells)
        correct = sum(c["correct"] for c in cells)
        correct_full = sum(c["correct_full"] for c in cells)
        both = sum(c["correct_both"] for c in cells)
        return {
            "policy": engine_config.policy,
            "kv_budget": engine_config.kv_budget,
            "reserve_ratio": float(np.mean(ratios)) if ratios else 1.0,
            "reserve_ratio_max": float(np.max(ratios)) if ratios else 1.0,
            "accuracy": correct / n if n else 0.0,
            "accuracy_full": correct_full / n if n else 0.0,
            "relative_accuracy": both / correct_full if correct_full else 0.0,
            "samples": samples,
            "seed": seed,
            "cells": cells,
        }
    finally:
        if comp is not None:
            comp.ctx.close()
        full.ctx.close()
        model.close()
