"""A chat model with a full KV cache, on llama-cpp-python's high-level API.

This is the full-cache chat of the foundation release: it streams tokens with the
model's own chat template. The compressed engine replaces it behind the same
``stream_reply`` interface.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from spindle_local.errors import ModelError, SpindleError, UsageError
from spindle_local.runtime.gguf_meta import ModelMeta, read_meta
from spindle_local.runtime.loader import load_llama_cpp


@dataclass
class GenerationSettings:
    temperature: float = 0.7
    max_tokens: int = 512
    seed: int | None = None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence llama.cpp's C-level logging on fd 2 while loading (it ignores verbose=False)."""
    if os.environ.get("SPINDLE_LOCAL_DEBUG"):
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class ChatModel:
    """One loaded model and its context; holds no conversation (the caller does)."""

    def __init__(self, model_path: Path, *, n_ctx: int = 4096, n_threads: int | None = None,
                 seed: int | None = None) -> None:
        self.meta: ModelMeta = read_meta(model_path)
        if n_ctx <= 0:
            raise UsageError(f"--ctx must be positive, got {n_ctx}")
        if self.meta.n_ctx_train and n_ctx > self.meta.n_ctx_train:
            raise UsageError(f"--ctx {n_ctx} exceeds the model's trained context ({self.meta.n_ctx_train} tokens)")
        llama_cpp = load_llama_cpp()
        kwargs: dict[str, Any] = dict(model_path=str(model_path), n_ctx=n_ctx, verbose=False)
        if n_threads:
            kwargs["n_threads"] = n_threads
        if seed is not None:
            kwargs["seed"] = seed
        try:
            with _quiet_stderr():
                self.llm = llama_cpp.Llama(**kwargs)
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"llama.cpp could not load {model_path} ({self.meta.architecture}): "
                             f"{str(e).splitlines()[0] if str(e) else 'unsupported or corrupt model'}") from None
        self.n_ctx = n_ctx

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        """Tokens the templated conversation takes (approximate: template rendered without tools)."""
        text = "".join(m["content"] for m in messages)
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def stream_reply(self, messages: list[dict[str, str]], settings: GenerationSettings) -> Iterator[str]:
        """Yield the assistant's reply piece by piece for the conversation ``messages``."""
        if self.count_tokens(messages) >= self.n_ctx - 8:
            raise SpindleError(f"the conversation no longer fits in the context of {self.n_ctx} tokens; "
                               "use /reset or a larger --ctx")
        kwargs: dict[str, Any] = dict(messages=messages, stream=True, temperature=settings.temperature,
                                      max_tokens=settings.max_tokens)
        if settings.seed is not None:
            kwargs["seed"] = settings.seed
        try:
            for chunk in self.llm.create_chat_completion(**kwargs):
                delta = chunk["choices"][0].get("delta", {})
                piece = delta.get("content")
                if piece:
                    yield piece
        except ValueError as e:  # llama-cpp-python raises ValueError when the prompt overflows n_ctx
            raise SpindleError(f"generation stopped: {str(e).splitlines()[0]}") from None

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None
