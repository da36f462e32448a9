"""Where spindle-local keeps what it builds and downloads.

Everything lives under one cache root so that it is easy to find and delete:
``$SPINDLE_LOCAL_CACHE`` if set, else ``$XDG_CACHE_HOME/spindle-local``, else
``~/.cache/spindle-local``.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The root of spindle-local's cache (created on demand by the callers)."""
    override = os.environ.get("SPINDLE_LOCAL_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "spindle-local"


def models_dir() -> Path:
    return cache_root() / "models"


def wheels_dir() -> Path:
    return cache_root() / "wheels"


def build_dir() -> Path:
    return cache_root() / "build"


def read_user_file(path: str | Path, what: str) -> bytes:
    """The bytes of a file the user named, or a one-line UsageError saying what is wrong."""
    from spindle_local.errors import UsageError

    p = Path(path).expanduser()
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {p}") from None
    except IsADirectoryError:
        raise UsageError(f"{p} is a directory, not a {what}") from None
    except OSError as e:
        raise UsageError(f"cannot read {p}: {e.strerror}") from None
