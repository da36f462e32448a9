"""The interactive chat loop: reading lines, slash commands, streaming answers.

Kept apart from the model so the same loop drives the full-cache and the compressed
engines. Output goes to stdout (answers) and stderr (prompts, notices), so that
``spindle-local chat --prompt ... > answer.txt`` captures only the answer.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, TextIO

from spindle_local.errors import SpindleError, UsageError


@dataclass
class GenerationSettings:
    temperature: float = 0.7
    max_tokens: int = 512
    seed: int | None = None

HELP = """commands:
  /help            this list
  /reset           forget the conversation (keeps the system prompt)
  /system TEXT     set the system prompt and start over
  /stats           context in use
  /read FILE       read a text document into the conversation (then ask about it)
  /save FILE       save the conversation and its compressed KV cache (resume with --resume FILE)
  /exit, /quit     leave (Ctrl-D works too)
Ctrl-C stops the current answer; the part already written stays in the conversation."""


class ReplyModel(Protocol):
    n_ctx: int

    def stream_reply(self, messages: list[dict[str, str]], settings: object) -> Iterator[str]: ...

    def count_tokens(self, messages: list[dict[str, str]]) -> int: ...

    def stats_line(self) -> str: ...

    def ingest(self, messages: list[dict[str, str]], progress=None) -> int: ...

    def save_session(self, path: Path, messages: list[dict[str, str]], system_prompt: str | None) -> int: ...


def load_document(path: str | Path) -> str:
    """A UTF-8 text file's contents, or a one-line error."""
    from spindle_local.paths import read_user_file

    p = Path(path).expanduser()
    data = read_user_file(p, "document")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{p} is not UTF-8 text (byte {e.start}); convert it first") from None
    if not text.strip():
        raise UsageError(f"{p} is empty")
    return text


class ProgressLine:
    """One status line on stderr while a document is read: tokens, tokens/s, KV memory.

    Redrawn in place on a terminal; elsewhere only the closing summary is written.
    """

    def __init__(self, label: str, stream: TextIO, memory=None, width: int = 24) -> None:
        self.label = label
        self.stream = stream
        self.memory = memory  # () -> (bytes held, cap or 0)
        self.width = width
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.done = self.total = 0
        self.peak = 0

    def _kv(self) -> str:
        if self.memory is None:
            return ""
        held, cap = self.memory()
        self.peak = max(self.peak, held)
        return f"  KV {held / 2**20:.1f}" + (f"/{cap / 2**20:.1f} MiB" if cap else " MiB")

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        kv = self._kv()
        if not self.tty:
            return
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        fill = int(self.width * done / max(total, 1))
        bar = "#" * fill + "-" * (self.width - fill)
        self.stream.write(f"\r{self.label} [{bar}] {done:,}/{total:,} tokens  {rate:,.0f} tok/s{kv}\x1b[K")
        self.stream.flush()

    def finish(self) -> str:
        secs = time.perf_counter() - self.t0
        if self.tty:
            self.stream.write("\r\x1b[K")
        kv = self._kv()
        peak = f", peak {self.peak / 2**20:.1f} MiB" if self.memory is not None else ""
        return (f"{self.label}: {self.done:,} tokens in {secs:.1f} s ({self.done / max(secs, 1e-9):,.0f} tok/s)"
                f"{kv}{peak}")


class ChatRepl:
    """A conversation with one model, driven line by line."""

    def __init__(self, model: ReplyModel, settings: object, *, system_prompt: str | None = None,
                 stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None):
        self.model = model
        self.settings = settings
        self.system_prompt = system_prompt
        self.stdin = stdin or sys.stdin
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def _notice(self, text: str) -> None:
        width = max(20, min(shutil.get_terminal_size((80, 24)).columns, 100))
        for line in text.splitlines() or [""]:
            self.err.write(textwrap.fill(line, width=width, subsequent_indent="  ", break_long_words=False,
                                         break_on_hyphens=False) + "\n" if line else "\n")
        self.err.flush()

    def answer(self, user_text: str) -> str:
        """Stream one answer to stdout; Ctrl-C stops it and keeps what was written."""
        self.messages.append({"role": "user", "content": user_text})
        pieces: list[str] = []
        interrupted = False
        try:
            for piece in self.model.stream_reply(self.messages, self.settings):
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            interrupted = True
        except SpindleError:
            self.messages.pop()  # the turn did not happen; keep the conversation consistent
            raise
        text = "".join(pieces)
        self.messages.append({"role": "assistant", "content": text})
        self.out.write("\n")
        self.out.flush()
        if interrupted:
            self._notice("[stopped]")
        notice = getattr(self.model, "turn_notice", None)
        line = notice() if callable(notice) else None
        if line and self.stdin.isatty():
            self._notice(f"[{line}]")
        return text

    def read_document(self, path: str | Path) -> None:
        """Add a text file to the conversation as a user message and read it now.

        The prefill happens here (with a progress line), so the next question only adds
        its own tokens. On failure or Ctrl-C the document is not part of the conversation.
        """
        p = Path(path).expanduser()
        text = load_document(p)
        self.messages.append({"role": "user", "content": f"Here is the document {p.name}:\n\n{text}"})
        progress = ProgressLine(f"reading {p.name}", self.err, getattr(self.model, "kv_memory", None))
        try:
            self.model.ingest(self.messages, progress=progress)
        except KeyboardInterrupt:
            self.messages.pop()
            progress.finish()
            self._notice("[reading stopped; the document is not part of the conversation]")
            return
        except BaseException:
            self.messages.pop()
            if progress.tty:
                self.err.write("\n")
            raise
        self._notice(f"[{progress.finish()}]")

    def one_shot(self, prompt: str) -> int:
        text = self.answer(prompt)
        return 0 if text.strip() else 1

    def _command(self, line: str) -> bool:
        """Handle a slash command; return False when the chat should end."""
        cmd, _, arg = line.partition(" ")
        cmd = cmd.lower()
        if cmd in ("/exit", "/quit"):
            return False
        if cmd == "/help":
            self._notice(HELP)
        elif cmd == "/reset":
            self.reset()
            self._notice("[conversation cleared]")
        elif cmd == "/system":
            self.system_prompt = arg.strip() or None
            self.reset()
            self._notice("[system prompt set; conversation cleared]" if arg.strip() else "[system prompt removed]")
        elif cmd == "/stats":
            self._notice(f"messages: {len(self.messages)}  {self.model.stats_line()}")
        elif cmd in ("/read", "/save"):
            name = arg.strip()
            if not name:
                self._notice(f"usage: {cmd} FILE")
                return True
            try:
                if cmd == "/read":
                    self.read_document(name)
                else:
                    size = self.model.save_session(Path(name).expanduser(), self.messages, self.system_prompt)
                    self._notice(f"[saved {name}: {size / 2**20:.1f} MiB]")
            except SpindleError as e:
                self._notice(f"error: {e}")
            except OSError as e:
                self._notice(f"error: cannot write {name}: {e.strerror}")
        else:
            self._notice(f"unknown command {cmd}; /help lists the commands")
        return True

    def run(self) -> int:
        interactive = self.stdin.isatty()
        if interactive:
            self._notice("spindle-local chat: type a message, /help for commands, /exit or Ctrl-D to leave")
        while True:
            try:
                if interactive:
                    self.err.write("> ")
                    self.err.flush()
                    line = input() if self.stdin is sys.stdin else self.stdin.readline()
                else:
                    line = self.stdin.readline()
                    if line == "":
                        raise EOFError
            except EOFError:
                if interactive:
                    self.err.write("\n")
                return 0
            except KeyboardInterrupt:
                self._notice("\n(use /exit or Ctrl-D to leave)")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self._command(line):
                    return 0
                continue
            try:
                self.answer(line)
            except SpindleError as e:
                self._notice(f"error: {e}")
