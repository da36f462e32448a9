"""The interactive chat loop: reading lines, slash commands, streaming answers.

Kept apart from the model so the same loop drives the full-cache and the compressed
engines. Output goes to stdout (answers) and stderr (prompts, notices), so that
``spindle-local chat --prompt ... > answer.txt`` captures only the answer.

Ctrl-C: each turn runs inside the model's ``interruptible()`` region, where SIGINT only
asks the engine to stop at its next clean point (runtime/interrupt.py). Stopped while a
message or document is read, the turn is left out and the engine is as it was before;
stopped while answering, the part already shown stays in the conversation. At the
prompt, Ctrl-C clears the line; Ctrl-D, /exit or /bye leave.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol, TextIO

from spindle_local.errors import SpindleError, UsageError


@dataclass
class GenerationSettings:
    temperature: float = 0.7
    max_tokens: int = 512
    seed: int | None = None
    verbose: bool = False  # a tokens/s line after each answer (--verbose, /set verbose on)


HELP = '''commands:
  /help              this list
  /reset             forget the conversation (keeps the system prompt)
  /system TEXT       set the system prompt and start over
  /stats             context in use
  /read FILE         read a text document into the conversation (then ask about it)
  /save FILE         save the conversation and its compressed KV cache (resume with --resume FILE)
  /set               show the settings; /set verbose on|off (tokens/s after each answer),
                     /set temperature T, /set max-tokens N
  /exit, /bye        leave (Ctrl-D works too)
several lines in one message:
  end a line with \\ to continue on the next one, or put the text between two """ lines
  (arrow keys edit the line and recall earlier messages on a terminal)
Ctrl-C stops the current answer (the part already written stays in the conversation) or the
reading of a message or document (it is left out); at the prompt it clears the line.'''

PROMPT = ">>> "
CONTINUE = "... "
FENCE = '"""'


class ReplyModel(Protocol):
    n_ctx: int

    def stream_reply(self, messages: list[dict[str, str]], settings: object,
                     progress: Callable[[int, int], None] | None = None) -> Iterator[str]: ...

    def count_tokens(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> int: ...

    def context_cap(self) -> tuple[int, str]: ...

    def interruptible(self) -> AbstractContextManager[None]: ...

    def kv_now(self) -> int: ...

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
    """One status line on stderr while a prompt is read: tokens, tokens/s, KV now.

    The KV figure is the one /stats calls "KV now" (the bytes the conversation's tokens
    occupy: store + regular part), not the allocation. Redrawn in place on a terminal,
    after ``delay`` seconds (short prompts draw nothing); elsewhere only :meth:`finish`
    writes a summary, when the caller prints it.
    """

    def __init__(self, label: str, stream: TextIO, kv_now: Callable[[], int] | None = None,
                 width: int = 24, delay: float = 0.0, kv_cap: int = 0) -> None:
        self.label = label
        self.stream = stream
        self.kv_now = kv_now
        self.kv_cap = kv_cap  # the --kv-mem cap in bytes (0: none), shown as "now/cap"
        self.width = width
        self.delay = delay
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.done = self.total = 0
        self.peak = 0
        self.drawn = False

    def _kv(self) -> str:
        if self.kv_now is None:
            return ""
        now = self.kv_now()
        self.peak = max(self.peak, now)
        cap = f"/{self.kv_cap / 2**20:.1f}" if self.kv_cap else ""
        return f"KV now: {now / 2**20:.2f}{cap} MiB"

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        kv = self._kv()
        if not self.tty or time.perf_counter() - self.t0 < self.delay:
            return
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        fill = int(self.width * done / max(total, 1))
        bar = "#" * fill + "-" * (self.width - fill)
        self.stream.write(f"\r{self.label} [{bar}] {done:,}/{total:,} tokens  {rate:,.0f} tok/s  {kv}\x1b[K")
        self.stream.flush()
        self.drawn = True

    def clear(self) -> None:
        """Take the line off the terminal (before an answer is written where it was)."""
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False

    def finish(self) -> str:
        """The summary: tokens, time, rate and KV now (measured after the reading ended)."""
        secs = time.perf_counter() - self.t0
        self.clear()
        kv = self._kv()
        peak = f" (peak {self.peak / 2**20:.2f} MiB)" if self.kv_now is not None else ""
        return (f"{self.label}: {self.done:,} tokens in {secs:.1f} s ({self.done / max(secs, 1e-9):,.0f} tok/s), "
                f"{kv}{peak}")


@dataclass
class _Input:
    text: str
    block: bool  # typed as several lines (a """ block or \ continuations): never a command


class ChatRepl:
    """A conversation with one model, driven line by line."""

    def __init__(self, model: ReplyModel, settings: GenerationSettings, *, system_prompt: str | None = None,
                 stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None):
        self.model = model
        self.settings = settings
        self.system_prompt = system_prompt
        self.stdin = stdin or sys.stdin
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr
        self.messages: list[dict[str, str]] = []
        self.banner_shown = False
        self.interrupted = False  # the last answer was stopped with Ctrl-C
        self._readline = None  # the readline module while a terminal chat runs
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def _kv_cap(self) -> int:
        """The model's --kv-mem cap in bytes, or 0 (no cap, or a model that reports none)."""
        kv_memory = getattr(self.model, "kv_memory", None)
        return kv_memory()[1] if kv_memory is not None else 0

    def _notice(self, text: str) -> None:
        width = max(20, min(shutil.get_terminal_size((80, 24)).columns, 100))
        for line in text.splitlines() or [""]:
            self.err.write(textwrap.fill(line, width=width, subsequent_indent="  ", break_long_words=False,
                                         break_on_hyphens=False) + "\n" if line else "\n")
        self.err.flush()

    def show_banner(self) -> None:
        """One line saying what runs: model, context, policy, KV memory."""
        banner = getattr(self.model, "banner", None)
        if callable(banner) and not self.banner_shown:
            self.err.write(banner() + "\n")  # one line, never wrapped
            self.err.flush()
        self.banner_shown = True

    # -- fitting the context ------------------------------------------------------------------

    def _reserve(self, limit: int) -> int:
        """Tokens kept free for the answer when a message is checked against the context."""
        return min(self.settings.max_tokens, max(16, limit // 8))

    def _fit(self, messages: list[dict[str, str]], *, what: str, add_generation_prompt: bool) -> list[dict[str, str]]:
        """``messages`` (the last one new) as they fit in the context: the oldest turns left out if needed.

        Leaving turns out is announced; when even the system prompt and the new message
        alone leave no room for an answer, a UsageError naming the real limit is raised and
        nothing changes.
        """
        limit, name = self.model.context_cap()
        reserve = self._reserve(limit)
        n = self.model.count_tokens(messages, add_generation_prompt=add_generation_prompt)
        if n + reserve <= limit:
            return messages
        head = messages[:1] if messages and messages[0]["role"] == "system" else []
        body = messages[len(head):]
        dropped = 0
        while n + reserve > limit and len(body) > 1:
            k = 2 if len(body) > 2 and body[0]["role"] == "user" and body[1]["role"] == "assistant" else 1
            body = body[k:]
            dropped += k
            n = self.model.count_tokens(head + body, add_generation_prompt=add_generation_prompt)
        if n + reserve > limit:
            raise UsageError(f"the {what} needs {n:,} tokens{' with the system prompt' if head else ''} plus "
                             f"{reserve} for an answer, more than the context holds ({name}); it was not added")
        self._notice(f"[context full ({name}): leaving out the {dropped} oldest "
                     f"message{'s' if dropped > 1 else ''} to make room]")
        return head + body

    # -- turns -------------------------------------------------------------------------------

    def answer(self, user_text: str) -> str | None:
        """Stream one answer to stdout; returns its text, or None when the turn was left out.

        Ctrl-C while the message is read leaves the turn out (the engine is as before);
        during the answer it stops it and keeps what was written.
        """
        self.interrupted = False
        failure: SpindleError | None = None
        pieces: list[str] = []
        progress = ProgressLine("reading your message", self.err, getattr(self.model, "kv_now", None), delay=0.5,
                                kv_cap=self._kv_cap())
        with self.model.interruptible():
            candidate = self._fit(self.messages + [{"role": "user", "content": user_text}], what="message",
                                  add_generation_prompt=True)
            stream = self.model.stream_reply(candidate, self.settings, progress=progress)
            try:
                for piece in stream:
                    if not pieces:
                        progress.clear()
                    pieces.append(piece)
                    self.out.write(piece)
                    self.out.flush()
            except KeyboardInterrupt:
                self.interrupted = True
            except SpindleError as e:
                failure = e
            except BaseException:
                progress.clear()
                raise
            finally:
                stream.close()
        progress.clear()
        last = getattr(self.model, "last", None)
        started = last is None or last.answer_started
        if self.interrupted and not started:
            self._notice("[stopped while reading your message; it is not part of the conversation]")
            return None
        if failure is not None and not started:
            raise failure  # the prompt was not read: the engine is as before, the turn is left out
        text = "".join(pieces)
        self.messages = candidate + [{"role": "assistant", "content": text}]  # never lose a shown answer
        self.out.write("\n")
        self.out.flush()
        if failure is not None:
            self._notice(f"error: {failure} (the answer so far stays in the conversation)")
        self._after_answer(last)
        return text

    def _after_answer(self, last) -> None:
        """The marks after an answer: stopped, cut, the verbose line, the memory picture."""
        if self.interrupted:
            self._notice("[stopped]")
        elif last is not None and last.finish == "length":
            self._notice(f"[cut: the answer reached --max-tokens ({self.settings.max_tokens} tokens)]")
        elif last is not None and last.finish == "context":
            self._notice(f"[cut: the context is full ({self.model.context_cap()[1]}); the next message "
                         "leaves out the oldest turns]")
        if self.settings.verbose and last is not None:
            rate = last.generated / max(last.decode_seconds, 1e-9)
            read = last.prefilled / max(last.prefill_seconds, 1e-9)
            self.err.write(f"[{last.generated} tokens in {last.decode_seconds:.2f} s, {rate:.1f} tok/s · prompt "
                           f"{last.prompt_tokens:,} tokens, {last.prefilled:,} read in {last.prefill_seconds:.2f} s "
                           f"({read:,.0f} tok/s)]\n")
            self.err.flush()
        notice = getattr(self.model, "turn_notice", None)
        line = notice() if callable(notice) else None
        if line and self.stdin.isatty():
            self._notice(f"[{line}]")

    def read_document(self, path: str | Path) -> None:
        """Add a text file to the conversation as a user message and read it now.

        The prefill happens here (with a progress line), so the next question only adds
        its own tokens. On failure or Ctrl-C the document is not part of the conversation
        and the engine is as it was. The file itself is read before the interruptible
        region: a named pipe nobody writes to blocks in ``open``, where Ctrl-C must work.
        """
        p = Path(path).expanduser()
        stopped = "[reading stopped; the document is not part of the conversation]"
        try:
            text = load_document(p)
        except KeyboardInterrupt:
            self._notice(stopped)
            return
        message = {"role": "user", "content": f"Here is the document {p.name}:\n\n{text}"}
        progress = ProgressLine(f"reading {p.name}", self.err, getattr(self.model, "kv_now", None),
                                kv_cap=self._kv_cap())
        with self.model.interruptible():
            candidate = self._fit(self.messages + [message], what=f"document {p.name}", add_generation_prompt=False)
            try:
                self.model.ingest(candidate, progress=progress)
            except KeyboardInterrupt:
                progress.clear()
                self._notice(stopped)
                return
            except BaseException:
                progress.clear()
                raise
            self.messages = candidate
        self._notice(f"[{progress.finish()}]")

    def one_shot(self, prompt: str) -> int:
        text = self.answer(prompt)
        if self.interrupted or text is None:
            return 130
        return 0 if text.strip() else 1

    # -- commands ----------------------------------------------------------------------------

    def _set(self, arg: str) -> None:
        name, _, value = arg.strip().partition(" ")
        name, value = name.lower().replace("_", "-"), value.strip().lower()
        s = self.settings
        try:
            if not name:
                self._notice(f"verbose {'on' if s.verbose else 'off'}  temperature {s.temperature:g}  "
                             f"max-tokens {s.max_tokens}")
            elif name == "verbose":
                if value not in ("", "on", "off", "true", "false", "1", "0"):
                    raise ValueError
                s.verbose = value in ("", "on", "true", "1")
                self._notice(f"[verbose {'on' if s.verbose else 'off'}]")
            elif name == "quiet":
                s.verbose = False
                self._notice("[verbose off]")
            elif name == "temperature":
                t = float(value)
                if t < 0:
                    raise ValueError
                s.temperature = t
                self._notice(f"[temperature {t:g}]")
            elif name == "max-tokens":
                n = int(value)
                if n < 1:
                    raise ValueError
                s.max_tokens = n
                self._notice(f"[max-tokens {n}]")
            else:
                self._notice(f"unknown setting {name}; /set verbose on|off, /set temperature T, /set max-tokens N")
        except ValueError:
            self._notice(f"usage: /set {name} " + {"verbose": "on|off", "temperature": "T (>= 0)",
                                                   "max-tokens": "N (>= 1)"}.get(name, "VALUE"))

    def _command(self, line: str) -> bool:
        """Handle a slash command; return False when the chat should end."""
        cmd, _, arg = line.partition(" ")
        cmd = cmd.lower()
        if cmd in ("/exit", "/quit", "/bye"):
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
        elif cmd == "/set":
            self._set(arg)
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

    # -- input -------------------------------------------------------------------------------

    def _setup_readline(self) -> None:
        """Line editing and history (arrow keys, Ctrl-R) on a terminal, kept across chats."""
        if self.stdin is not sys.stdin:
            return
        try:
            import readline
        except ImportError:  # a Python built without it: plain input() still works
            return
        self._readline = readline
        try:
            readline.read_history_file(self._history_path())
        except (OSError, ValueError):
            pass
        readline.set_history_length(1000)

    @staticmethod
    def _history_path() -> str:
        from spindle_local.paths import cache_root

        return str(cache_root() / "chat_history")

    def _save_history(self) -> None:
        if self._readline is None:
            return
        try:
            Path(self._history_path()).parent.mkdir(parents=True, exist_ok=True)
            self._readline.write_history_file(self._history_path())
        except OSError:
            pass

    def _readline_raw(self, prompt: str) -> str | None:
        """One line without its newline; None at end of input."""
        if self.stdin.isatty() and self.stdin is sys.stdin:
            if self.out.isatty():
                return _input(prompt)  # readline draws the prompt and redraws it while editing
            self.err.write(prompt)
            self.err.flush()
            return _input("")
        if self.stdin.isatty():
            self.err.write(prompt)
            self.err.flush()
        line = self.stdin.readline()
        return None if line == "" else line.rstrip("\r\n")

    def read_message(self) -> _Input | None:
        """The next message: one line, a line ending in ``\\`` continued on the next ones, or a
        block between two lines of ``\"\"\"``. None at end of input."""
        first = self._readline_raw(PROMPT)
        if first is None:
            return None
        stripped = first.strip()
        if stripped.startswith(FENCE):
            rest = stripped[len(FENCE):]
            if rest.endswith(FENCE) and len(rest) >= len(FENCE):  # """one line"""
                return _Input(rest[:-len(FENCE)].strip(), block=True)
            lines = [rest] if rest else []
            while True:
                line = self._readline_raw(CONTINUE)
                if line is None:
                    break
                if line.rstrip().endswith(FENCE):
                    lines.append(line.rstrip()[:-len(FENCE)])
                    break
                lines.append(line)
            return _Input("\n".join(lines).strip("\n"), block=True)
        if first.endswith("\\"):
            lines = [first[:-1]]
            while True:
                line = self._readline_raw(CONTINUE)
                if line is None:
                    break
                if line.endswith("\\"):
                    lines.append(line[:-1])
                    continue
                lines.append(line)
                break
            return _Input("\n".join(lines).strip(), block=True)
        return _Input(stripped, block=False)

    def _prompt_interrupted(self) -> None:
        """Ctrl-C at the prompt: the line (or the block being typed) is dropped; say how to leave."""
        typed = self._readline.get_line_buffer() if self._readline is not None else ""
        self.err.write("\n")
        if not typed:
            self._notice("(Ctrl-D or /bye to leave)")
        self.err.flush()

    def run(self) -> int:
        interactive = self.stdin.isatty()
        self.show_banner()
        if interactive:
            self._setup_readline()
            self._notice(f'type a message ({FENCE} ... {FENCE} or a trailing \\ for several lines), /help for '
                         "commands, Ctrl-D or /bye to leave")
        try:
            while True:
                try:
                    got = self.read_message()
                except KeyboardInterrupt:
                    self._prompt_interrupted()
                    continue
                except EOFError:
                    got = None
                if got is None:
                    if interactive:
                        self.err.write("\n")
                    return 0
                if not got.text.strip():
                    continue
                if not got.block and got.text.startswith("/"):
                    try:
                        if not self._command(got.text):
                            return 0
                    except KeyboardInterrupt:  # e.g. during /save: it leaves the previous file
                        self._notice("[stopped]")
                    continue
                try:
                    self.answer(got.text)
                except SpindleError as e:
                    self._notice(f"error: {e}")
                except KeyboardInterrupt:  # outside the engine's work: nothing was half done
                    self._notice("[stopped]")
        finally:
            self._save_history()


def _input(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None
