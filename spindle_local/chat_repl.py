"""The interactive chat loop: reading lines, slash commands, streaming answers.

Kept apart from the model so the same loop drives the full-cache and the compressed
engines. Output goes to stdout (answers) and stderr (prompts, notices), so that
``spindle-local chat --prompt ... > answer.txt`` captures only the answer.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
import sys
import textwrap
from typing import Protocol, TextIO, Iterator

from spindle_local.errors import SpindleError


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
  /exit, /quit     leave (Ctrl-D works too)
Ctrl-C stops the current answer; the part already written stays in the conversation."""


class ReplyModel(Protocol):
    n_ctx: int

    def stream_reply(self, messages: list[dict[str, str]], settings: object) -> Iterator[str]: ...

    def count_tokens(self, messages: list[dict[str, str]]) -> int: ...

    def stats_line(self) -> str: ...


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
            self.err.write(textwrap.fill(line, width=width, subsequent_indent="  ") + "\n" if line else "\n")
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
