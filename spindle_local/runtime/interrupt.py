"""Ctrl-C that is safe by construction: a flag, checked between native calls.

While the engine decodes, llama.cpp may call back into Python (the log callback). A
``KeyboardInterrupt`` raised there is
swallowed by ctypes (a traceback is printed, the decode runs on) or leaves a batch
half decoded. So while the engine works, SIGINT only sets a :class:`CancelFlag`; the
engine looks at the flag where stopping is clean — before a prompt chunk, before a
generated token is fed — and raises :class:`Interrupted` there. Whatever Python code
the handler itself runs inside a callback is one attribute assignment.

Another thread (a server's request handler) may set the flag as well; signal handlers
can only be installed from the main thread, so elsewhere :func:`sigint_sets` is a no-op.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Interrupted(KeyboardInterrupt):
    """The work was cancelled (Ctrl-C or the flag); raised only at a point where stopping is clean.

    A subclass of ``KeyboardInterrupt`` so that code which already treats Ctrl-C as
    "stop" (the CLI's exit status 130) handles it unchanged.
    """


class CancelFlag:
    """A cancel request: set from a signal handler or another thread, read by the engine.

    A plain attribute rather than ``threading.Event``: setting it takes no lock, so it
    is safe in a signal handler whatever the interrupted code held.
    """

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def check(self) -> None:
        """Raise :class:`Interrupted` (and clear the flag: the request is answered) if it is set."""
        if self._set:
            self._set = False
            raise Interrupted()

    def on_sigint(self, signum: int, frame: object) -> None:  # noqa: ARG002
        """The SIGINT handler: only records the request."""
        self._set = True


def handler_installed(flag: CancelFlag) -> bool:
    """Is SIGINT currently routed to ``flag``?"""
    try:
        return signal.getsignal(signal.SIGINT) == flag.on_sigint
    except ValueError:  # not the main interpreter
        return False


@contextmanager
def sigint_sets(flag: CancelFlag) -> Iterator[bool]:
    """While inside, SIGINT sets ``flag`` instead of raising ``KeyboardInterrupt``.

    Yields whether this call installed the handler (False when it already was, or off
    the main thread, where Python never runs signal handlers anyway). Nested uses are
    free, so the engine can guard every call and a chat can guard a whole turn.
    """
    if threading.current_thread() is not threading.main_thread() or handler_installed(flag):
        yield False
        return
    if signal.getsignal(signal.SIGINT) is None:  # a handler installed outside Python: leave it alone
        yield False
        return
    previous = signal.signal(signal.SIGINT, flag.on_sigint)
    try:
        yield True
    finally:
        signal.signal(signal.SIGINT, previous)
