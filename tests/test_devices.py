"""The CPU threads ggml gets by default (runtime/devices.py), on fake sysfs trees."""

from __future__ import annotations

from pathlib import Path

from spindle_local.runtime.devices import default_threads


def _sysfs(root: Path, siblings: dict[int, str]) -> Path:
    for cpu, text in siblings.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "thread_siblings_list").write_text(text + "\n")
    return root


def test_one_thread_per_physical_core(tmp_path: Path) -> None:
    # 4 cores with two hardware threads each, numbered as Linux does on x86 (i and i + 4)
    sysfs = _sysfs(tmp_path, {c: f"{c % 4},{c % 4 + 4}" for c in range(8)})
    assert default_threads(range(8), sysfs) == 4
    assert default_threads([0, 4], sysfs) == 1  # both threads of one core
    assert default_threads([0, 1, 2], sysfs) == 3  # a cpuset of three cores' first threads


def test_cores_without_smt_and_unknown_topology(tmp_path: Path) -> None:
    sysfs = _sysfs(tmp_path / "a", {0: "0", 1: "1"})
    assert default_threads([0, 1], sysfs) == 2
    assert default_threads([0, 1, 2], sysfs) == 3  # no topology for cpu2: every allowed CPU
    assert default_threads([], sysfs) == 1


def test_this_machine_gets_at_least_one_thread() -> None:
    assert default_threads() >= 1
