"""scripts/pool_retrieval.py: draws of eval needle / eval ruler pooled into one figure."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pool_retrieval.py"


@pytest.fixture(scope="module")
def pool():
    spec = importlib.util.spec_from_file_location("pool_retrieval", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _needle_row(seed, cells, commit="abc"):
    return {"policy": "spindle", "kv_budget": 0.25, "protocol": "multi", "label": "spindle @0.25", "seed": seed,
            "logprob_delta": 0.0, "provenance": {"source": {"commit": commit, "dirty": False}},
            "cells": [{"length": n, "depth": d, "correct": c, "correct_full": f, "correct_both": b}
                      for n, d, c, f, b in cells]}


def test_needle_draws_pool_keys_found_by_both(pool, tmp_path, capsys):
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps(_needle_row(1, [(1000, 0.1, 2, 2, 2), (3000, 0.9, 1, 2, 1)])) + "\n")
    b = tmp_path / "b.json"  # --json output: one row, indented
    b.write_text(json.dumps(_needle_row(2, [(1000, 0.1, 3, 1, 1)]), indent=2))
    assert pool.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "4 of the full cache's 5 keys (0.800)" in out
    assert "found 6 keys in all; 2 draws" in out
    assert "lost at 3000/0.9" in out
    assert "by length: 1000: 3/3; 3000: 1/2" in out
    assert "several commits" not in out


def test_rows_from_two_commits_are_flagged(pool, tmp_path, capsys):
    a = tmp_path / "a.jsonl"
    a.write_text("\n".join(json.dumps(_needle_row(s, [(1000, 0.5, 1, 1, 1)], commit=c))
                           for s, c in ((1, "aaa"), (2, "bbb"))))
    assert pool.main([str(a)]) == 0
    assert "rows from several commits" in capsys.readouterr().out


def test_ruler_pools_by_prompts_and_flags_draws_below(pool, tmp_path, capsys):
    def row(seed, n, score, full):
        return {"policy": "spindle", "kv_budget": 0.25, "seed": seed, "label": "spindle @0.25",
                "summary": {"vt": {"later": {"n": n, "score": score, "score_full": full}}}}
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps(row(0, 2, 0.0, 0.5)) + "\n" + json.dumps(row(1, 6, 0.5, 0.0)) + "\n")
    assert pool.main(["--points", "5", str(f)]) == 0
    out = capsys.readouterr().out
    # pooled by prompts: (0*2 + 0.5*6)/8 = 0.375 against (0.5*2)/8 = 0.125
    assert "0.375 vs full 0.125 (+25.0 points, 8 prompts)" in out
    assert "seed 0 -50.0" in out
    assert "1 of 2" in out


def test_bad_input_is_one_line_and_exit_2(pool, tmp_path, capsys):
    assert pool.main([str(tmp_path / "missing.jsonl")]) == 2
    empty = tmp_path / "e.json"
    empty.write_text("{}")
    assert pool.main([str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error:") for line in err)


def test_rows_with_other_stage_settings_are_pooled_apart(pool, tmp_path, capsys):
    plain = _needle_row(1, [(1000, 0.1, 1, 1, 1)])
    other = _needle_row(1, [(1000, 0.1, 0, 1, 0)])
    other["provenance"]["engine"] = {"stages": {"salient.echo_last": "true"}}
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps(plain) + "\n" + json.dumps(other) + "\n")
    assert pool.main([str(f)]) == 0
    out = capsys.readouterr().out
    assert "spindle @0.25 [multi]: 1 of the full cache's 1 keys" in out
    assert "spindle @0.25 salient.echo_last=true [multi]: 0 of the full cache's 1 keys" in out
