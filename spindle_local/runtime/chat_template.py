"""Rendering a conversation with the model's own chat template, and streaming detokenization.

llama.cpp recognises the common templates (ChatML, Llama 3, Gemma, ...) from the
template string stored in the GGUF; for others we fall back to the Jinja renderer that
llama-cpp-python ships. Models without any template get a plain "role: text" layout.
"""

from __future__ import annotations

import codecs
import ctypes

import llama_cpp.llama_cpp as C

from spindle_local.runtime.lowlevel import LlamaModel


class ChatTemplate:
    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        raw = C.llama_model_chat_template(model.model, None)
        self.template: bytes | None = raw if raw else None

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        if self.template is None:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant: " if add_generation_prompt else "")
        arr = (C.llama_chat_message * len(messages))()
        keep = []
        for i, m in enumerate(messages):
            role, content = m["role"].encode(), m["content"].encode("utf-8")
            keep += [role, content]
            arr[i].role = role
            arr[i].content = content
        size = 1024 + 2 * sum(len(m["content"].encode("utf-8")) + 32 for m in messages)
        buf = ctypes.create_string_buffer(size)
        n = C.llama_chat_apply_template(self.template, arr, len(messages), add_generation_prompt, buf, size)
        if n > size:
            buf = ctypes.create_string_buffer(n + 1)
            n = C.llama_chat_apply_template(self.template, arr, len(messages), add_generation_prompt, buf, n + 1)
        if n >= 0:
            return buf.raw[:n].decode("utf-8", "replace")
        return self._render_jinja(messages, add_generation_prompt)

    def _render_jinja(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        fmt = Jinja2ChatFormatter(template=self.template.decode("utf-8", "replace"), eos_token="", bos_token="",
                                  add_generation_prompt=add_generation_prompt)
        return fmt(messages=messages).prompt


class Detokenizer:
    """Turns a stream of token ids into text, never splitting a UTF-8 character."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")

    def piece_bytes(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self.model.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.model.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def push(self, token: int) -> str:
        return self._dec.decode(self.piece_bytes(token))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


def eog_tokens(model: LlamaModel) -> set[int]:
    """All end-of-generation tokens of the vocabulary (EOS, EOT, <|im_end|>, ...)."""
    return {t for t in range(model.n_vocab) if C.llama_vocab_is_eog(model.vocab, t)} if model.n_vocab <= 300_000 \
        else {int(C.llama_vocab_eos(model.vocab))}
