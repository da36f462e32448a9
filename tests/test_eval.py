"""The evaluation commands' contract: JSON fields, small real runs, clean refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli

KLD_FIELDS = {"model", "policy", "kv_budget", "cache_type", "context_tokens", "continuation_tokens",
              "reserve_ratio", "kv_bytes", "kv_bytes_full", "mean_kld", "p99_kld", "top1_agreement", "ppl",
              "ppl_full"}
NEEDLE_FIELDS = {"model", "policy", "kv_budget", "reserve_ratio", "accuracy", "accuracy_full",
                 "relative_accuracy", "cells"}
SPEED_FIELDS = {"prefill_tps", "decode_tps", "compress_seconds", "prefill_tps_stock", "decode_tps_stock",
                "decode_ratio", "peak_rss_bytes", "peak_rss_bytes_stock"}


def _json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_kld_compressed_vs_full(default_model: Path) -> None:
    small = ["--context", "1400", "--continuation", "48", "--recent", "64", "--chunk", "256", "--json"]
    r = _json(run_cli("eval", "kld", str(default_model), "--policy", "spindle", "--kv-budget", "0.4", *small))
    assert KLD_FIELDS <= r.keys()
    assert r["context_tokens"] == 1400 and r["continuation_tokens"] == 48
    assert 0 < r["reserve_ratio"] <= 0.4 + 1e-9
    assert r["kv_bytes"] < r["kv_bytes_full"]
    assert r["mean_kld"] > 0 and 0 <= r["top1_agreement"] <= 1 and r["ppl"] > 1
    # The full policy through the same path is the reference itself: no divergence.
    f = _json(run_cli("eval", "kld", str(default_model), "--policy", "full", *small))
    assert f["mean_kld"] < 1e-3 and f["top1_agreement"] > 0.97 and f["reserve_ratio"] == pytest.approx(1.0)


def test_kld_quantized_cache(default_model: Path) -> None:
    r = _json(run_cli("eval", "kld", str(default_model), "--policy", "full", "--cache-type", "q4_0",
                      "--context", "600", "--continuation", "32", "--json"))
    assert r["cache_type"] == "q4_0"
    assert r["reserve_ratio"] == pytest.approx(18 / 32 / 2)
    assert r["mean_kld"] > 0


def test_needle_small_grid(default_model: Path) -> None:
    r = _json(run_cli("eval", "needle", str(default_model), "--lengths", "700", "--depths", "0.5",
                      "--samples", "2", "--kv-budget", "0.4", "--recent", "64", "--chunk", "128", "--seed", "3",
                      "--json"))
    assert NEEDLE_FIELDS <= r.keys() and r["protocol"] == "in-prompt"
    assert r["reserve_ratio"] <= 0.4 + 1e-9  # compressed (the prompt outgrows the regular cache's 512 cells)
    assert len(r["cells"]) == 1
    cell = r["cells"][0]
    assert {"length", "depth", "n", "correct", "correct_full"} <= cell.keys() and cell["n"] == 2
    assert r["accuracy_full"] == 1.0  # 700 tokens: the full cache always finds the key
    assert 0.0 <= r["relative_accuracy"] <= 1.0


def test_needle_question_later(default_model: Path) -> None:
    """The same prompts with the question fed after the compressed document; nothing re-read."""
    r = _json(run_cli("eval", "needle", str(default_model), "--protocol", "later", "--lengths", "700",
                      "--depths", "0.5", "--samples", "1", "--kv-budget", "0.25", "--recent", "64", "--chunk", "128",
                      "--seed", "3", "--threads", "1", "--json"))
    assert NEEDLE_FIELDS <= r.keys() and r["protocol"] == "later"
    assert r["accuracy_full"] == 1.0  # the full cache finds the key whichever the protocol
    assert r["reserve_ratio_after_document"] <= 0.25 + 1e-9  # compressed before the question was read
    assert r["question_reread_tokens"] == 0
    assert r["logprob_full"] is not None and r["logprob_full"] > -2.0
    assert r["cells"][0]["n"] == 1 and r["logprob_delta"] is not None


def test_bench_report_shows_both_protocols(tmp_path: Path) -> None:
    from spindle_local.eval.bench import write_report

    def grid(rel: float) -> dict:
        cells = [{"length": n, "depth": d, "n": 2, "correct": int(2 * rel), "correct_full": 2, "correct_both": int(2 * rel)}
                 for n in (1000, 3000) for d in (0.1, 0.9)]
        return {"reserve_ratio": 0.24, "accuracy": rel, "accuracy_full": 1.0, "relative_accuracy": rel,
                "logprob_delta": -1.5, "cells": cells}

    kld = {"reserve_ratio": 0.24, "mean_kld": 0.1, "p99_kld": 1.0, "top1_agreement": 0.9, "ppl": 9.0, "ppl_full": 8.0}
    rows = [{"label": "full f16", "policy": "full", "kv_budget": 1.0, "cache_type": "f16", "kld": kld,
             "needle": grid(1.0), "needle_later": grid(1.0)},
            {"label": "spindle @0.25", "policy": "spindle", "kv_budget": 0.25, "cache_type": "f16", "kld": kld,
             "needle": grid(1.0), "needle_later": grid(0.5)}]
    report = write_report({"model": "m.gguf", "grid": {}, "started": "now", "results": rows}, tmp_path).read_text()
    assert "question in prompt: relative" in report and "question later: relative" in report
    retrieval = report[report.index("## Pass-key retrieval"):]
    line = next(l for l in retrieval.splitlines() if l.startswith("| spindle @0.25"))
    assert "| 1.000 | 1.000 | 1.000 | -1.50 | 0.500 | 1.000 | 0.500 | -1.50 |" in line
    for name in ("needle_heatmaps.png", "needle_heatmaps_later.png"):
        assert (tmp_path / name).stat().st_size > 1000 and f"]({name})" in report
    assert not (tmp_path / "needle_heatmaps_multi.png").exists()


def test_speed_small(default_model: Path) -> None:
    r = _json(run_cli("eval", "speed", str(default_model), "--context", "700", "--gen", "8", "--reps", "1",
                      "--kv-budget", "0.4", "--recent", "64", "--chunk", "256", "--json"))
    assert SPEED_FIELDS <= r.keys()
    assert r["prefill_tps"] > 0 and r["decode_tps"] > 0 and r["decode_ratio"] > 0
    assert r["peak_rss_bytes"] > 0 and r["peak_rss_bytes_stock"] > 0


@pytest.mark.parametrize("args, phrase", [
    (["eval", "kld", "--kv-budget", "0"], "--kv-budget"),
    (["eval", "kld", "--kv-budget", "1.5"], "--kv-budget"),
    (["eval", "needle", "--policy", "h2o"], "policy 'h2o'"),
    (["eval", "kld", "--text", "/nonexistent.txt"], "not found"),
    (["eval", "kld", "--context", "9000"], "trained context"),
    (["eval", "needle", "--lengths", "20000"], "trained context"),
    (["eval", "needle", "--depths", "1.5"], "--depths"),
    (["eval", "speed", "--context", "9000"], "trained context"),
])
def test_invalid_arguments_exit_2(default_model: Path, args: list[str], phrase: str) -> None:
    proc = run_cli(*args, "--json")
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and phrase in lines[0]


@pytest.mark.model
def test_kld_text_too_short(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n")
    proc = run_cli("eval", "kld", "--text", str(short), "--context", "500", "--json")
    assert proc.returncode == 2 and "fewer than" in proc.stderr


@pytest.mark.parametrize("n", [1, 50, 400, 5000])
def test_prefix_tokens_equal_the_whole_texts_first_tokens(n: int) -> None:
    """Tokenizing a prefix gives the whole text's first ``n`` tokens (a word-level and a
    byte-level tokenizer), and all of them when the text has fewer."""
    from spindle_local.eval.texts import prefix_tokens, pydoc_text

    text = pydoc_text()[:20000]
    read: list[int] = []

    def words(t: str) -> list[int]:
        read.append(len(t))
        return [hash(w) for w in t.split()]

    def octets(t: str) -> list[int]:
        return list(t.encode())

    assert prefix_tokens(words, text, n) == words(text)[:n]
    assert prefix_tokens(octets, text, n) == octets(text)[:n]
    if n + 16 <= len(text.split()):
        assert max(read[:-1]) < len(text)  # only a prefix was tokenized
