"""A chat model on the compressing engine: template, prefix reuse, streaming.

Each turn renders the whole conversation with the model's template and feeds only the
part the engine does not already hold. The engine keeps every token it has seen; the
longest common prefix with the new rendering is reused. If the rendering diverges
inside the recent (uncompressed) part, the cache is cut back there; if it diverges
inside the compressed store, the exact state is gone and the conversation is re-read.
"""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from spindle_local.errors import UsageError
from spindle_local.runtime.chat_template import ChatTemplate, Detokenizer, eog_tokens
from spindle_local.runtime.engine import Engine, EngineConfig, Sampler
from spindle_local.runtime.memory import format_size


@dataclass
class ReuseCounters:
    """How much of each turn's prompt was prefilled versus reused (for tests and /stats)."""

    last_prompt_tokens: int = 0
    last_reused_tokens: int = 0
    last_prefilled_tokens: int = 0
    rereads: int = 0


@dataclass
class TurnStats:
    """The last answer, for the chat's marks and ``--verbose`` line.

    ``finish``: ``stop`` (an end-of-generation token or a stop string), ``length``
    (``--max-tokens``), ``context`` (the context is full), ``interrupted`` (Ctrl-C) or
    ``cancelled`` (the server's cancel flag); ``answer_started`` is False while the prompt
    is still being read (an interrupt then leaves the turn out).
    """

    prompt_tokens: int = 0
    prefilled: int = 0
    prefill_seconds: float = 0.0
    generated: int = 0
    decode_seconds: float = 0.0
    answer_started: bool = False
    finish: str | None = None


class _Cancelled(Exception):
    """Raised from the prefill's progress callback when the request was cancelled."""


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class StopStrings:
    """The text of a stream with stop strings cut off, handed out as soon as it is safe.

    Text that might be the start of a stop string is held back until it is known not to
    be one, so a stop string never reaches the caller. Without stop strings every piece
    passes through at once.
    """

    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text that may be shown now, whether a stop string ended the stream)."""
        self.pending += text
        keep = 0
        if self.stops:
            hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
            if hits:
                out, self.pending = self.pending[:min(hits)], ""
                return out, True
            keep = _held_back(self.pending, self.stops)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        """The text held back, at the end of a stream that no stop string ended."""
        out, self.pending = self.pending, ""
        return out


class EngineChatModel:
    """The chat REPL's model interface on top of :class:`Engine`."""

    def __init__(self, model_path: Path, config: EngineConfig) -> None:
        self.model_path = Path(model_path)
        self.engine = Engine(model_path, config)
        self.template = ChatTemplate(self.engine.model)
        self.stop = eog_tokens(self.engine.model)
        self.n_ctx = self.engine.max_tokens
        self.reuse = ReuseCounters()
        self.last = TurnStats()

    def count_tokens(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> int:
        return len(self._tokens(messages, add_generation_prompt=add_generation_prompt))

    def _tokens(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
        # Contents are plain text: "<|im_start|>" typed by a user is not a control token.
        return self.template.tokens(messages, add_generation_prompt=add_generation_prompt)

    def context_cap(self) -> tuple[int, str]:
        """(most tokens the conversation may hold, what sets it: "--ctx 128", "the model's trained context ...")."""
        return self.engine.context_limit()

    def interruptible(self) -> AbstractContextManager[None]:
        """A region (one chat turn) where Ctrl-C stops the engine at its next clean point (Interrupted)."""
        return self.engine.interruptible()

    def kv_now(self) -> int:
        """KV bytes the conversation occupies now: what /stats calls "KV now" (store + regular tokens)."""
        return self.engine.refresh_stats().kv_bytes

    def banner(self) -> str:
        """One line for the start of a chat: model, context, policy, KV memory."""
        eng, cfg = self.engine, self.engine.config
        limit, name = eng.context_limit()
        held, _ = eng.kv_memory()
        if cfg.policy == "full":
            policy = "policy full (no compression)"
        elif cfg.kv_mem is not None:
            policy = f"policy {cfg.policy}, kv-mem {format_size(cfg.kv_mem)}"
        else:
            policy = f"policy {cfg.policy}, kv-budget {cfg.kv_budget:g}"
        ctx = f"context {limit:,} tokens" + (" (trained)" if name.startswith("the model's") else "")
        return f"{self.model_path.stem} · {ctx} · {policy} · KV {held / 2**20:.1f} MiB allocated"

    def _prefill(self, prompt: list[int], progress: Callable[[int, int], None] | None, *,
                 cancel: threading.Event | None = None, atomic: bool = True) -> np.ndarray:
        """Feed what the engine lacks of ``prompt``; return the next-token logits.

        ``atomic``: on Ctrl-C or an error, return to the state before (the chat leaves an
        interrupted turn out). The server feeds without it, so the chunks read before its
        client left stay and the next request reuses them. ``cancel`` is looked at between
        chunks and raises :class:`_Cancelled`.
        """
        def report(done: int, total: int, stats: object) -> None:
            if cancel is not None and cancel.is_set():
                raise _Cancelled  # between chunks: the engine holds exactly what it fed
            if progress is not None:
                progress(done, total)

        with self.engine.transaction() if atomic else nullcontext():
            todo = self._sync(prompt)
            return self.engine.feed(todo, progress=report if progress or cancel else None)

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

    def stream_reply(self, messages: list[dict[str, str]], settings,
                     progress: Callable[[int, int], None] | None = None) -> Iterator[str]:
        """Answer the conversation, streaming text; :attr:`last` tells how the answer ended.

        Ctrl-C (inside :meth:`interruptible`) while the prompt is read leaves the engine as
        it was before the turn; during the answer, it keeps the prompt and the tokens fed
        so far (every shown token but possibly the last). Either way Interrupted is raised.
        """
        self.last = TurnStats()  # now, not at the first next(): the caller reads it whatever happens
        return self._stream_reply(messages, settings, progress)

    def _stream_reply(self, messages: list[dict[str, str]], settings,
                      progress: Callable[[int, int], None] | None) -> Iterator[str]:
        prompt = self._tokens(messages, add_generation_prompt=True)
        sampler = Sampler(temperature=settings.temperature, seed=settings.seed)
        yield from self._answer(prompt, sampler, self.last, max_tokens=settings.max_tokens, progress=progress)

    def _answer(self, prompt: list[int], sampler, turn: TurnStats, *, max_tokens: int,
                stops: tuple[str, ...] = (), progress: Callable[[int, int], None] | None = None,
                cancel: threading.Event | None = None, atomic: bool = True) -> Iterator[str]:
        """Read ``prompt`` (reusing the held prefix), then stream the answer's text: the one
        generation loop of the chat and the server. ``turn`` is filled in as it goes.

        Ends at an end-of-generation token, ``max_tokens``, a full context, a stop string
        (never shown), ``cancel`` (looked at between prefill chunks and between tokens) or
        Ctrl-C (Interrupted, raised after ``turn.finish = "interrupted"``).
        """
        turn.prompt_tokens = len(prompt)
        t0 = time.perf_counter()
        try:
            logits = self._prefill(prompt, progress, cancel=cancel, atomic=atomic)
        except _Cancelled:
            turn.finish = "cancelled"
            return
        turn.prefilled, turn.prefill_seconds = self.reuse.last_prefilled_tokens, time.perf_counter() - t0
        turn.answer_started = True
        detok = Detokenizer(self.engine.model)
        text = StopStrings(stops)
        gen = self.engine.generate(logits, max_tokens=max_tokens, sampler=sampler, stop=self.stop)
        t1 = time.perf_counter()
        try:
            for tok in gen:
                turn.generated += 1
                out, stopped = text.push(detok.push(tok))
                if out:
                    yield out
                if stopped:
                    turn.finish = "stop"
                    return
                if cancel is not None and cancel.is_set():
                    turn.finish = "cancelled"
                    return
            turn.finish = self.engine.finish_reason
        except KeyboardInterrupt:
            turn.finish = "interrupted"
            raise
        finally:
            turn.decode_seconds = time.perf_counter() - t1
            gen.close()
        out, stopped = text.push(detok.flush())
        tail = out + ("" if stopped else text.flush())
        if tail:
            yield tail

    def ingest(self, messages: list[dict[str, str]], progress=None) -> int:
        """Read the conversation so far (e.g. a document just added) without answering.

        The next turn then reuses all of it. Returns the number of tokens prefilled.
        ``progress(done, total)`` is called after every chunk. Ctrl-C (inside
        :meth:`interruptible`) or an error leaves the engine exactly as it was before.
        """
        prompt = self._tokens(messages, add_generation_prompt=False)
        self._prefill(prompt, progress)
        return self.reuse.last_prefilled_tokens

    def kv_memory(self) -> tuple[int, int]:
        """(KV bytes llama.cpp holds: regular allocation + store, the --kv-mem cap or 0)."""
        return self.engine.kv_memory()

    def save_session(self, path: Path, messages: list[dict[str, str]], system_prompt: str | None) -> int:
        """Write the conversation and the engine's KV state to ``path``; returns the file size."""
        from spindle_local.runtime import session

        return session.save(path, self.engine, messages=messages, system_prompt=system_prompt,
                            model_path=self.model_path)

    def resume(self, saved) -> None:
        """Continue a saved session (a checked :class:`~spindle_local.runtime.session.Session`)."""
        from spindle_local.runtime import session

        session.restore(self.engine, saved)

    def stats_line(self) -> str:
        s = self.engine.refresh_stats()
        held, cap = self.engine.kv_memory()
        limit = f" / {cap / 2**20:.1f} MiB cap" if cap else ""
        return (f"tokens seen: {s.tokens_seen}  KV now: {s.kv_bytes / 2**20:.2f} MiB  "
                f"full cache: {s.full_bytes / 2**20:.2f} MiB  reserve ratio: {s.reserve_ratio:.3f}  "
                f"allocated: {held / 2**20:.1f} MiB{limit}  "
                f"policy: {self.engine.config.policy}  compressions: {s.compressions}"
                + self._layers_note())

    def _layers_note(self) -> str:
        """Which layers the store compresses, when not all of them (sliding-window models)."""
        e = self.engine
        ids, n = e.store_layer_ids, e.geometry.n_layer
        if len(ids) == n:
            return ""
        return f"  compressed layers: {len(ids)} of {n} ({', '.join(map(str, ids))}; the others keep a window)"

    def turn_notice(self) -> str | None:
        """After a long prompt, the memory picture (shown by the chat without asking)."""
        return self.stats_line() if self.reuse.last_prefilled_tokens >= 1024 else None

    def close(self) -> None:
        self.engine.close()



# ----------------------------------------------------------------------------------------
# The OpenAI-compatible server's model: settings, usage counts and finish reasons in
# OpenAI's terms, on the same generation loop as the chat (EngineChatModel._answer).
# ----------------------------------------------------------------------------------------


@dataclass
class CompletionSettings:
    """One request's sampling settings, in OpenAI terms (``top_k`` is llama.cpp's extension)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 40
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass
class CompletionResult:
    """Filled in while a completion streams: what the response's ``usage`` and ``finish_reason`` report."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop", "length", or "cancelled" (client gone)


#: TurnStats.finish in OpenAI's words: a full context cuts an answer as max_tokens does.
_OPENAI_FINISH = {"context": "length", "interrupted": "cancelled"}


class _BiasedSampler:
    """A :class:`Sampler` that adds OpenAI-style ``logit_bias`` to the logits first."""

    def __init__(self, sampler: Sampler, bias: dict[int, float]) -> None:
        self.sampler = sampler
        self.ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        self.values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))

    def sample(self, logits: np.ndarray) -> int:
        logits = np.array(logits, dtype=np.float32, copy=True)
        logits[self.ids] += self.values
        return self.sampler.sample(logits)


class ServingChatModel(EngineChatModel):
    """EngineChatModel plus what the HTTP server needs: OpenAI sampling settings, stop
    strings, usage counts, finish reasons, cancellation and plain-text completions.

    Generation is the chat's loop (:meth:`EngineChatModel._answer`); :attr:`last` holds
    the same :class:`TurnStats` as in the chat.
    """

    def context_limit(self) -> int:
        """The most tokens (prompt + completion) one sequence may reach with this configuration."""
        limit = self.engine.max_tokens
        if self.engine.config.policy == "full":
            limit = min(limit, self.engine.cells)
        return limit

    def chat_prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        return self._tokens(messages, add_generation_prompt=True)

    def text_prompt_tokens(self, text: str) -> list[int]:
        # Like llama-cpp-python's create_completion: BOS per the model, special tokens parsed.
        return self.engine.model.tokenize(text, add_special=True, parse_special=True)

    def stream_tokens(self, prompt: list[int], settings: CompletionSettings,
                      result: CompletionResult, cancel: threading.Event | None = None) -> Iterator[str]:
        """Generate after ``prompt`` (reusing the held prefix); yield text, honour stop strings.

        A stop string never reaches the caller. ``cancel`` is checked between prefill chunks
        and between tokens: setting it stops generation promptly (finish_reason
        "cancelled"); the chunks read so far stay for the next request.
        """
        if not prompt:
            raise UsageError("the prompt is empty")
        result.prompt_tokens = len(prompt)
        sampler = Sampler(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                          seed=settings.seed)
        if settings.logit_bias:
            sampler = _BiasedSampler(sampler, settings.logit_bias)
        self.last = turn = TurnStats()
        try:
            yield from self._answer(prompt, sampler, turn, max_tokens=settings.max_tokens, stops=settings.stop,
                                    cancel=cancel, atomic=False)
        finally:
            result.completion_tokens = turn.generated
            result.finish_reason = _OPENAI_FINISH.get(turn.finish, turn.finish)

    def stream_chat(self, messages: list[dict[str, str]], settings: CompletionSettings,
                    result: CompletionResult, cancel: threading.Event | None = None) -> Iterator[str]:
        """``stream_reply`` with OpenAI's settings, stop strings and usage counts."""
        return self.stream_tokens(self.chat_prompt_tokens(messages), settings, result, cancel)

    def stream_completion(self, prompt_text: str, settings: CompletionSettings,
                          result: CompletionResult, cancel: threading.Event | None = None) -> Iterator[str]:
        """A plain-text completion of ``prompt_text``, with the same prefix reuse as chat."""
        return self.stream_tokens(self.text_prompt_tokens(prompt_text), settings, result, cancel)

    def stats_dict(self) -> dict:
        """Memory and reuse counters for ``/spindle/stats`` (call from the engine's thread)."""
        s = self.engine.refresh_stats()
        return {
            "policy": self.engine.config.policy,
            "kv_budget": self.engine.config.kv_budget,
            "kv_mem": self.engine.config.kv_mem,
            "kv_allocated_bytes": self.engine.kv_memory()[0],
            "tokens_held": s.tokens_seen,
            "kv_bytes": s.kv_bytes,
            "store_bytes": s.store_bytes,
            "regular_bytes": s.regular_bytes,
            "full_bytes": s.full_bytes,
            "reserve_ratio": s.reserve_ratio,
            "compressions": s.compressions,
            "compressed_layers": list(self.engine.store_layer_ids),
            "memory": self.engine.memory_parts(),
            "context_limit": self.context_limit(),
            "reuse": {
                "last_prompt_tokens": self.reuse.last_prompt_tokens,
                "last_reused_tokens": self.reuse.last_reused_tokens,
                "last_prefilled_tokens": self.reuse.last_prefilled_tokens,
                "rereads": self.reuse.rereads,
            },
        }
