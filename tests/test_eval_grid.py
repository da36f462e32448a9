"""Evaluation grids in one process: one row per configuration with provenance, the full
cache's results computed once (and, for KLD, kept in a --base file), and --cells."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

SMALL_KLD = ["--context", "300", "--continuation", "16", "--threads", "1"]
PROVENANCE = {"source", "patch_hash", "runtime_build", "engine", "stages", "machine", "date"}


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def kld_grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """``eval kld`` over two configurations, the reference saved to a --base file. Small cells
    (``--chunk 64 --recent 64``), so that the 300-token context is compressed: one that fits
    in the cells is held whole, and its KLD is 0 like the full cache's."""
    d = tmp_path_factory.mktemp("kld")
    proc = run_cli("eval", "kld", "--policy", "full,snapkv", "--kv-budget", "0.5", *SMALL_KLD,
                   "--chunk", "64", "--recent", "64",
                   "--base", str(d / "ref.npz"), "--out", str(d / "new" / "rows.jsonl"))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (d / "new" / "rows.jsonl").read_text().splitlines()]
    return d, rows


@pytest.mark.model
def test_grid_writes_a_row_per_configuration_with_provenance(kld_grid) -> None:
    d, rows = kld_grid
    assert [r["label"] for r in rows] == ["full", "snapkv @0.5"]
    assert [r["policy"] for r in rows] == ["full", "snapkv"]
    for r in rows:
        p = r["provenance"]
        assert PROVENANCE <= p.keys()
        assert p["source"]["commit"] is None or len(p["source"]["commit"]) == 40
        assert len(p["patch_hash"]) == 64 and p["machine"]["cores"] >= 1 and p["date"].endswith("+00:00")
        assert p["engine"]["policy"] == r["policy"] and p["engine"]["n_threads"] == 1
    assert rows[0]["provenance"]["stages"] is None  # full has no stages
    assert rows[1]["provenance"]["stages"]["scorer"] == "window" and rows[1]["provenance"]["engine"]["kv_budget"] == 0.5
    # one reference for the grid: computed for the first configuration, reused by the second
    assert [r["reference"] for r in rows] == ["computed", "reused"]
    assert rows[1]["reserve_ratio"] <= 0.5 + 1e-9
    assert rows[0]["mean_kld"] < 1e-6 and rows[1]["mean_kld"] > 1e-3
    assert (d / "ref.npz").is_file()


@pytest.mark.model
def test_base_file_is_read_not_recomputed(kld_grid, tmp_path: Path) -> None:
    d, _ = kld_grid
    # A copy with other logits but the same tokens and identity: a run that reads it scores
    # the full cache against those logits; one that recomputed them would measure 0.
    base = tmp_path / "ref.npz"
    with np.load(d / "ref.npz") as f:
        saved = {k: f[k] for k in f.files}
    noise = np.random.default_rng(0).normal(0, 3, saved["logits"].shape).astype(saved["logits"].dtype)
    with base.open("wb") as f:
        np.savez(f, **{**saved, "logits": saved["logits"] + noise})
    proc = run_cli("eval", "kld", "--policy", "full", *SMALL_KLD, "--base", str(base), "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["reference"] == "loaded" and r["reference_file"] == str(base)
    assert r["mean_kld"] > 0.1
    # the untouched file gives the reference itself back
    r = json.loads(run_cli("eval", "kld", "--policy", "full", *SMALL_KLD, "--base", str(d / "ref.npz"),
                           "--json").stdout)
    assert r["reference"] == "loaded" and r["mean_kld"] < 1e-6


@pytest.mark.model
@pytest.mark.parametrize("args, phrase", [
    (["--context", "300", "--continuation", "17"], "--continuation"),
    (["--context", "300", "--continuation", "16", "--offset", "3"], "--offset"),
])
def test_base_file_of_another_run_is_refused(kld_grid, args: list[str], phrase: str) -> None:
    d, _ = kld_grid
    before = (d / "ref.npz").read_bytes()
    line = _one_line_error(run_cli("eval", "kld", "--threads", "1", *args, "--base", str(d / "ref.npz")))
    assert "--base" in line and phrase in line
    assert (d / "ref.npz").read_bytes() == before


@pytest.mark.model
def test_base_file_that_is_not_a_reference_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "ref.npz"
    bad.write_text("not a zip\n")
    line = _one_line_error(run_cli("eval", "kld", *SMALL_KLD, "--base", str(bad)))
    assert "not a saved KLD reference" in line


@pytest.mark.model
def test_needle_grid_over_cells_answers_the_full_cache_once(tmp_path: Path) -> None:
    out = tmp_path / "needle.jsonl"
    proc = run_cli("eval", "needle", "--cells", "600:0.5", "--samples", "1", "--policy", "full,streaming",
                   "--kv-budget", "0.4", "--recent", "64", "--chunk", "128", "--threads", "1", "--json",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    printed = [json.loads(line) for line in proc.stdout.splitlines()]  # one JSON line per configuration
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == [r["label"] for r in printed] == ["full", "streaming @0.4"]
    assert [(c["length"], c["depth"], c["n"]) for c in rows[1]["cells"]] == [(600, 0.5, 1)]
    assert [r["full_cache_runs"] for r in rows] == [1, 0]  # the second configuration reuses the first's answers
    assert rows[0]["accuracy_full"] == rows[1]["accuracy_full"]
    assert rows[1]["reserve_ratio"] <= 0.4 + 1e-9
    assert all(PROVENANCE <= r["provenance"].keys() for r in rows)


@pytest.mark.model
def test_needle_rows_of_a_quantized_cache_are_measured_against_f16(tmp_path: Path) -> None:
    """--policy full with a q4_0 cache is a configuration of its own, not the f16 reference."""
    out = tmp_path / "needle.jsonl"
    proc = run_cli("eval", "needle", "--cells", "600:0.5", "--samples", "1", "--policy", "full",
                   "--set", "cache_type=f16,q4_0", "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    f16, q4 = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["provenance"]["engine"]["cache_type"] for r in (f16, q4)] == ["f16", "q4_0"]
    assert f16["reserve_ratio"] == 1.0
    assert 0.2 < q4["reserve_ratio"] < 0.4  # q4_0 holds 4.5 bits of 16: measured on the quantized engine
    assert q4["full_cache_runs"] == 0 and q4["accuracy_full"] == f16["accuracy_full"]


@pytest.mark.parametrize("args, phrase", [
    (["--cells", "3500"], "--cells"),
    (["--cells", "3500:deep"], "--cells"),
    (["--cells", "3500:1.5"], "--cells"),
    (["--cells", "0:0.5"], "--cells"),
    (["--cells", ","], "--cells"),
    (["--cells", "3500:0.1", "--lengths", "1000"], "not both"),
    (["--cells", "3500:0.1", "--depths", "0.5"], "not both"),
    (["--cells", "3500:0.1", "--protocol", "multi"], "--cells"),
])
def test_bad_cells_are_one_line(args: list[str], phrase: str) -> None:
    assert phrase in _one_line_error(run_cli("eval", "needle", *args))


@pytest.mark.parametrize("args, phrase", [
    (["kld", "--kv-budget", "0.25,much"], "--kv-budget"),
    (["kld", "--cache-type", "q4_0", "--policy", "full,snapkv"], "one configuration"),
    (["speed", "--policy", "full,spindle", "--set", "salient.share=0.1,0.2"], "full"),
    (["ruler", "--out", "/proc/no/such/rows.jsonl"], "--out"),
])
def test_bad_grids_are_one_line(args: list[str], phrase: str) -> None:
    assert phrase in _one_line_error(run_cli("eval", *args))


def test_speed_grid_runs_in_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every round measures each configuration once, after stock once per threads/flash setting."""
    from spindle_local.eval import speed

    calls: list[tuple] = []

    def child(args: dict, env: dict | None = None) -> dict:
        calls.append((args["mode"], args["engine"]["policy"], args["threads"]))
        # spindle-local gets slower every run: a drift that rounds must spread over the rows
        t = 1.0 + 0.1 * len(calls)
        return {"prefill_seconds": t, "decode_seconds": t, "compress_seconds": 0.0,
                "compress_seconds_decode": 0.0, "probe_seconds": 0.0, "reserve_ratio": 0.25, "peak_rss_bytes": 1}

    monkeypatch.setattr(speed, "_run_child", child)
    engines = [{"policy": "snapkv", "n_threads": 2, "flash_attn": True},
               {"policy": "spindle", "n_threads": 2, "flash_attn": True},
               {"policy": "spindle", "n_threads": 1, "flash_attn": True}]
    rows = speed.measure_speed(model="m.gguf", context=100, gen=4, reps=2, engines=engines)
    one_round = [("stock", "snapkv", 2), ("spindle", "snapkv", 2), ("spindle", "spindle", 2),
                 ("stock", "spindle", 1), ("spindle", "spindle", 1)]
    assert calls == one_round * 2
    assert [r["stock_reused"] for r in rows] == [False, True, False]
    # the two rows that share stock runs share its figures, and each row's medians are its own runs
    assert rows[0]["decode_tps_stock"] == rows[1]["decode_tps_stock"] != rows[2]["decode_tps_stock"]
    assert rows[0]["decode_tps_runs"] == pytest.approx([4 / 1.2, 4 / 1.7], abs=0.01) and rows[1]["prefill_seconds"] == pytest.approx(1.55)


def test_labels_name_what_varies() -> None:
    from spindle_local.eval.grid import labels
    from spindle_local.options import engine_grid

    cfgs = engine_grid(policy="snapkv,spindle", kv_budget="0.25", settings=("lookahead=true,false",))
    assert labels(cfgs) == ["snapkv @0.25 lookahead=True", "snapkv @0.25 lookahead=False",
                            "spindle @0.25 lookahead=True", "spindle @0.25 lookahead=False"]


def test_bench_rows_record_provenance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_bench's contract without a model: one model load, one KLD reference, provenance per row."""
    from spindle_local.eval import bench, kld, needle
    from spindle_local.runtime.config import EngineConfig

    loads, refs = [], []

    class Model:
        def close(self) -> None:
            loads.append("closed")

    def load_model(self: EngineConfig, path: str) -> Model:
        loads.append("loaded")
        return Model()

    def reference(*a: object, **k: object) -> str:
        refs.append(1)
        return "the reference"

    def run_kld(path: str, *, engine_config: EngineConfig, cache_type: str, ref: str, **k: object) -> dict:
        assert ref == "the reference"
        return {"reserve_ratio": engine_config.kv_budget, "mean_kld": 0.1, "p99_kld": 1.0, "top1_agreement": 0.9,
                "ppl": 9.0, "ppl_full": 8.0}

    def run_needle(path: str, **k: object) -> dict:
        cells = [{"length": 600, "depth": 0.5, "n": 1, "correct": 1, "correct_full": 1, "correct_both": 1}]
        return {"reserve_ratio": 0.4, "accuracy": 1.0, "accuracy_full": 1.0, "relative_accuracy": 1.0,
                "logprob_delta": None, "cells": cells}

    monkeypatch.setattr(EngineConfig, "load_model", load_model)
    monkeypatch.setattr(kld, "reference", reference)
    monkeypatch.setattr(kld, "run_kld", run_kld)
    monkeypatch.setattr(needle, "run_needle", run_needle)
    grid = bench.BenchGrid(policies=("snapkv",), budgets=(0.4,), lengths=(600,), depths=(0.5,), samples=1,
                           protocols=("in-prompt",))
    bench.run_bench("m.gguf", tmp_path, grid, EngineConfig(n_threads=1), "text")
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["label"] for r in rows] == ["full f16", "full q8_0", "full q4_0", "snapkv @0.4"]
    assert loads == ["loaded", "closed"] and refs == [1]
    for r in rows:
        assert PROVENANCE <= r["provenance"].keys()
        assert (r["provenance"]["engine"]["policy"], r["provenance"]["engine"]["cache_type"]) == (
            r["policy"], r["cache_type"])
    assert rows[-1]["provenance"]["stages"]["allocator"] == "flat" and rows[0]["provenance"]["stages"] is None
