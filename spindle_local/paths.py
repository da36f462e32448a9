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
