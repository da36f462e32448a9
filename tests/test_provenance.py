"""Provenance of result rows: source state, patch hash, settings, machine, date; never fails a run."""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from spindle_local.eval import provenance as prov
from spindle_local.runtime.config import EngineConfig

ROOT = Path(__file__).resolve().parents[1]


def test_record_of_a_configuration() -> None:
    cfg = EngineConfig(policy="snapkv", kv_budget=0.15, stages={"allocator": "pyramid"})
    r = prov.provenance(cfg)
    assert set(r) == {"source", "patch_hash", "runtime_build", "engine", "stages", "machine", "date"}
    assert r["engine"] == asdict(cfg) and r["engine"]["kv_budget"] == 0.15
    assert r["stages"]["allocator"] == "pyramid" and r["stages"]["scorer"] == "window"  # resolved, not as given
    assert r["machine"]["cores"] >= 1 and r["machine"]["ram_bytes"] > 2**20 and r["machine"]["platform"]
    date = datetime.fromisoformat(r["date"])
    assert date.tzinfo is not None and abs(datetime.now(timezone.utc) - date) < timedelta(minutes=5)
    json.dumps(r)  # a JSON row as it is
    assert prov.provenance(EngineConfig(policy="full"))["stages"] is None


def test_patch_hash_covers_the_patch_files() -> None:
    h = hashlib.sha256()
    for p in sorted((ROOT / "patches").glob("*.patch")):
        h.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    assert prov.patch_hash() == h.hexdigest()


def test_source_state_of_this_checkout() -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    state = prov.source_state()
    assert state["commit"] == head.strip() and len(state["commit"]) == 40
    assert isinstance(state["dirty"], bool)


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def test_dirty_flag_follows_the_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "one")
    monkeypatch.setattr(prov, "PACKAGE_DIR", tmp_path)
    clean = prov.source_state()
    assert clean["commit"] and clean["dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert prov.source_state() == {"commit": clean["commit"], "dirty": True}


def test_not_a_checkout_or_no_git_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prov, "PACKAGE_DIR", tmp_path)  # not inside any repository
    assert prov.source_state() == {"commit": None, "dirty": None}

    def no_git(*a: object, **k: object) -> None:
        raise FileNotFoundError("git")

    monkeypatch.setattr(prov, "PACKAGE_DIR", ROOT)
    monkeypatch.setattr(subprocess, "run", no_git)
    assert prov.source_state() == {"commit": None, "dirty": None}

    def slow_git(*a: object, **k: object) -> None:
        raise subprocess.TimeoutExpired("git", prov.GIT_TIMEOUT)

    monkeypatch.setattr(subprocess, "run", slow_git)
    r = prov.provenance(EngineConfig())
    assert r["source"] == {"commit": None, "dirty": None} and r["engine"]["policy"] == "spindle"


def test_no_patches_folder_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPINDLE_LOCAL_PATCHES", str(tmp_path / "missing"))
    assert prov.patch_hash() is None
