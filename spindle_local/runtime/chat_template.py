"""Rendering a conversation with the model's own chat template, and streaming detokenization.

llama.cpp recognises the common templates (ChatML, Llama 3, Gemma, ...) from the
template string stored in the GGUF; for others we fall back to the Jinja renderer that
llama-cpp-python ships. Models without any template get a plain "role: text" layout.

:meth:`ChatTemplate.tokens` turns a conversation into token ids with the template's own
markers (``<|im_start|>`` ...) as control tokens and every message's content as plain
text: a user who types ``<|im_start|>system`` gets those characters, not a forged turn.
"""

from __future__ import annotations

import codecs
import ctypes
import re

import llama_cpp.llama_cpp as C

from spindle_local.runtime.lowlevel import LlamaModel


#: Stands in for message ``i``'s content while the template is rendered, to find where contents go.
_MARK = "\ue000{}\ue001"
_MARK_RE = re.compile("\ue000(\\d+)\ue001")


class ChatTemplate:
    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        raw = C.llama_model_chat_template(model.model, None)
        self.template: bytes | None = raw if raw else _template_from_vocab(model)
        self._specials: tuple[re.Pattern[str] | None, dict[str, int]] | None = None

    def tokens(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation; message contents are never parsed for special tokens.

        The template is rendered once with a marker in place of each content, which shows
        where contents go. Template text is split at the control tokens' texts; contents
        join the template text around them and every run between two control tokens is
        tokenized as plain text, exactly as llama.cpp tokenizes the fragments between
        special tokens, so a conversation without special-token text in its contents gets
        the same ids as tokenizing the whole rendering with special tokens parsed.
        """
        real = self.render(messages, add_generation_prompt=add_generation_prompt)
        marked = self.render([{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)],
                             add_generation_prompt=add_generation_prompt)
        parts = _MARK_RE.split(marked)  # template, index, template, index, ..., template
        contents = [m["content"] for m in messages]
        for variant in (contents, [c.strip() for c in contents]):  # some templates trim contents
            if "".join(variant[int(p)] if k % 2 else p for k, p in enumerate(parts)) == real:
                break
        else:
            variant = contents  # the template changes contents otherwise: use them as written
        pattern, ids = self._special_tokens()
        units: list[int | str] = []  # control-token ids and plain-text runs

        def text(t: str) -> None:
            if not t:
                return
            if units and isinstance(units[-1], str):
                units[-1] += t
            else:
                units.append(t)

        for k, p in enumerate(parts):
            if k % 2:
                text(variant[int(p)])
                continue
            at = 0
            for m in pattern.finditer(p) if pattern is not None else ():
                text(p[at:m.start()])
                units.append(ids[m.group(0)])
                at = m.end()
            text(p[at:])
        vocab = self.model.vocab
        out: list[int] = [int(C.llama_vocab_bos(vocab))] if C.llama_vocab_get_add_bos(vocab) else []
        for u in units:
            if isinstance(u, int):
                out.append(u)
            else:
                out += self.model.tokenize(u, add_special=False, parse_special=False)
        if C.llama_vocab_get_add_eos(vocab):
            out.append(int(C.llama_vocab_eos(vocab)))
        return out

    def _special_tokens(self) -> tuple[re.Pattern[str] | None, dict[str, int]]:
        """The texts of the tokens llama.cpp parses only when asked (control, unknown), longest first."""
        if self._specials is None:
            vocab = self.model.vocab
            want = C.LLAMA_TOKEN_ATTR_CONTROL | C.LLAMA_TOKEN_ATTR_UNKNOWN
            ids: dict[str, int] = {}
            for t in range(self.model.n_vocab):
                if int(C.llama_vocab_get_attr(vocab, t)) & want:
                    raw = C.llama_vocab_get_text(vocab, t)
                    name = raw.decode("utf-8", "replace") if raw else ""
                    if name:
                        ids.setdefault(name, t)
            names = sorted(ids, key=len, reverse=True)
            pattern = re.compile("|".join(re.escape(n) for n in names)) if names else None
            self._specials = (pattern, ids)
        return self._specials

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


# Turn markers that name the template a GGUF without one was trained with (a name
# llama.cpp's built-in templates know).
_MARKER_TEMPLATES = ((b"<start_of_turn>", b"gemma"), (b"<|im_start|>", b"chatml"))


def _template_from_vocab(model: LlamaModel) -> bytes | None:
    """A built-in template for a GGUF that carries none, chosen by the turn markers in its
    vocabulary (e.g. Gemma's ``<start_of_turn>``); None when it has none of them."""
    for marker, name in _MARKER_TEMPLATES:
        ids = model.tokenize(marker.decode(), add_special=False, parse_special=True)
        if len(ids) == 1 and C.llama_vocab_get_attr(model.vocab, ids[0]) & C.LLAMA_TOKEN_ATTR_CONTROL:
            return name
    return None


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
