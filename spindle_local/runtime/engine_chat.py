"""A chat model on the compressing engine: template, prefix reuse, streaming.

Each turn renders the whole conversation with the model's template and feeds only the
part the engine does not already hold. The engine keeps every token it has seen; the
longest common prefix with the new rendering is reused. If the rendering diverges
inside the recent (uncompressed) part, the cache is cut back there; if it diverges
inside the compressed store, the exact state is gone and the conversation is re-read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from spindle_local.runtime.chat_template import ChatTemplate, Detokenizer, eog_tokens
from spindle_local.runtime.engine import Engine, EngineConfig, Sampler


@dataclass
class ReuseCounters:
    """How much of each turn's prompt was prefilled versus reused (for tests and /stats)."""

    last_prompt_tokens: int = 0
    last_reused_tokens: int = 0
    last_prefilled_tokens: int = 0
    rereads: int = 0


class EngineChatModel:
    """The chat REPL's model interface on top of :class:`Engine`."""

    def __init__(self, model_path: Path, config: EngineConfig) -> None:
        self.engine = Engine(model_path, config)
        self.template = ChatTemplate(self.engine.model)
        self.stop = eog_tokens(self.engine.model)
        self.n_ctx = self.engine.max_tokens
        self.reuse = ReuseCounters()

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self._tokens(messages, add_generation_prompt=False))

    def _tokens(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
        text = self.template.render(messages, add_generation_prompt=add_generation_prompt)
        return self.engine.model.tokenize(text, add_special=True, parse_special=True)

    def _sync(self, prompt: list[int]) -> list[int]:
        """Bring the engine to a prefix of ``prompt``; return the tokens still to feed."""
        held = self.engine.tokens
        lcp = 0
        for a, b in zip(held, prompt):
            if a != b:
                break
            lcp += 1
        if lcp == len(prompt):  # the prompt is entirely held: re-feed its last token for fresh logits
            lcp -= 1
        if lcp < len(held):
            if not self.engine.truncate(lcp):
                self.engine.reset()
                self.reuse.rereads += 1
                lcp = 0
        self.reuse.last_prompt_tokens = len(prompt)
        self.reuse.last_reused_tokens = lcp
        self.reuse.last_prefilled_tokens = len(prompt) - lcp
        return prompt[lcp:]

    def stream_reply(self, messages: list[dict[str, str]], settings) -> Iterator[str]:
        prompt = self._tokens(messages, add_generation_prompt=True)
        todo = self._sync(prompt)
        logits = self.engine.feed(todo)
        sampler = Sampler(temperature=settings.temperature, seed=settings.seed)
        detok = Detokenizer(self.engine.model)
        for tok in self.engine.generate(logits, max_tokens=settings.max_tokens, sampler=sampler, stop=self.stop):
            piece = detok.push(tok)
            if piece:
                yield piece
        tail = detok.flush()
        if tail:
            yield tail

    def stats_line(self) -> str:
        s = self.engine.refresh_stats()
        return (f"tokens seen: {s.tokens_seen}  KV now: {s.kv_bytes / 2**20:.2f} MiB  "
                f"full cache: {s.full_bytes / 2**20:.2f} MiB  reserve ratio: {s.reserve_ratio:.3f}  "
                f"policy: {self.engine.config.policy}  compressions: {s.compressions}")

    def turn_notice(self) -> str | None:
        """After a long prompt, the memory picture (shown by the chat without asking)."""
        return self.stats_line() if self.reuse.last_prefilled_tokens >= 1024 else None

    def close(self) -> None:
        self.engine.close()

