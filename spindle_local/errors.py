"""Errors that reach the user as one clear line.

Everything the CLI and server report to a person derives from :class:`SpindleError`;
the CLI prints ``str(err)`` and exits with ``err.exit_code`` instead of a traceback.
"""

from __future__ import annotations


class SpindleError(Exception):
    """An error with a message meant for the user (one line, no traceback)."""

    exit_code: int = 1


class UsageError(SpindleError):
    """Bad arguments or input the user can fix (exit status 2)."""

    exit_code = 2


class ModelError(SpindleError):
    """A model file that is missing, not a GGUF, corrupt or unsupported."""

    exit_code = 2


class RuntimeNotPatchedError(SpindleError):
    """The loaded llama.cpp library lacks the spindle-local patch (or has another version)."""

    exit_code = 3


class BuildError(SpindleError):
    """Building the patched runtime failed."""

    exit_code = 4
