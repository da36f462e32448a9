"""Where a result came from: source tree, llama.cpp patches, settings, machine and date.

Every result row the evaluation commands and ``spindle-local bench`` write carries
:func:`provenance`, so that a number in a results file can be traced to the code and the
configuration that produced it. Nothing here may fail a run: a source tree that is not a
git checkout (an installed wheel), a missing ``git`` or a missing ``patches/`` folder is
recorded as None.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

#: seconds a git command may take before its answer is recorded as unknown
GIT_TIMEOUT = 5.0
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def source_state() -> dict[str, Any]:
    """The git commit of the tree the package is imported from and whether it has uncommitted
    changes (both None when it is not a git checkout or git cannot tell in time)."""
    head = _git("rev-parse", "HEAD")
    if head is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain")
    return {"commit": head.strip(), "dirty": None if status is None else bool(status.strip())}


def patch_hash() -> str | None:
    """sha256 over the llama.cpp patches (name and content digest of each, in name order: the
    patch part of :meth:`~spindle_local.runtime.build.BuildConfig.key`); None without them."""
    from spindle_local.runtime.build import patch_files

    try:
        files = patch_files()
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    except Exception:  # noqa: BLE001 - BuildError without a patches/ folder, unreadable files
        return None
    return h.hexdigest() if files else None


def runtime_build() -> str | None:
    """The build key of the installed patched llama.cpp (its stamp), or None."""
    from spindle_local.runtime.build import installed_stamp

    try:
        return (installed_stamp() or {}).get("key")
    except Exception:  # noqa: BLE001
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def _total_ram() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def machine() -> dict[str, Any]:
    """Platform, CPU model, logical cores and total RAM in bytes."""
    return {"platform": platform.platform(), "cpu": _cpu_model(), "cores": os.cpu_count(),
            "ram_bytes": _total_ram()}


def provenance(cfg: Any = None) -> dict[str, Any]:
    """The record a result row carries: ``source`` (commit, dirty), ``patch_hash``,
    ``runtime_build``, ``engine`` (the resolved :class:`EngineConfig`, None without one),
    ``stages`` (every stage setting of its policy; None for ``full``), ``machine`` and
    ``date`` (UTC, ISO 8601)."""
    stages = None
    if cfg is not None:
        resolved = cfg.resolved_stages()
        stages = resolved.settings() if resolved is not None else None
    return {
        "source": source_state(),
        "patch_hash": patch_hash(),
        "runtime_build": runtime_build(),
        "engine": asdict(cfg) if cfg is not None else None,
        "stages": stages,
        "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
