"""Long documents in bounded KV memory (--kv-mem), and the chat's --file / /read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from spindle_local.errors import UsageError
from spindle_local.runtime.memory import CELL_BLOCK, parse_size, plan_memory, smallest_kv_mem

SMOL_BYTES_PER_TOKEN = 23040  # SmolLM2-135M: 30 layers x 3 KV heads x (64 + 64) x 2 bytes


@pytest.mark.parametrize("text,value", [("64MiB", 64 << 20), ("64 mib", 64 << 20), ("1.5GiB", 3 << 29),
                                        ("512KiB", 512 << 10), ("2G", 2 << 30), ("1000", 1000)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "MiB", "64MB/s", "-3MiB", "0", "12XB"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


@pytest.mark.parametrize("tokens", [320, 700, 1500, 4000, 20000])
def test_layout_fits_the_cap(tokens: int) -> None:
    t, layers = SMOL_BYTES_PER_TOKEN, 30
    mem = tokens * t
    if mem < smallest_kv_mem(t, layers):
        with pytest.raises(UsageError, match="smallest workable value is"):
            plan_memory(mem, bytes_per_token=t, n_layer=layers, window=32, recent=256, chunk=512, max_tokens=8192)
        return
    lay = plan_memory(mem, bytes_per_token=t, n_layer=layers, window=32, recent=256, chunk=512, max_tokens=8192)
    assert lay.cells % CELL_BLOCK == 0 and lay.regular_bytes == lay.cells * t
    assert lay.regular_bytes + lay.store_cap <= mem
    assert lay.recent >= 32 and lay.recent + lay.chunk <= lay.cells
    if lay.cells < 8192:
        assert lay.store_cap >= 64 * t  # room for a useful store


def test_smallest_value_is_workable() -> None:
    low = smallest_kv_mem(SMOL_BYTES_PER_TOKEN, 30)
    plan_memory(low, bytes_per_token=SMOL_BYTES_PER_TOKEN, n_layer=30, window=32, recent=256, chunk=512,
                max_tokens=8192)
    with pytest.raises(UsageError):
        plan_memory(low - 1, bytes_per_token=SMOL_BYTES_PER_TOKEN, n_layer=30, window=32, recent=256,
                    chunk=512, max_tokens=8192)


def test_cli_refuses_impossible_kv_mem(default_model: Path) -> None:
    r = run_cli("chat", "--kv-mem", "2MiB", "--prompt", "hi")
    assert r.returncode == 2 and "smallest workable value is" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli("chat", "--kv-mem", "64MiB", "--kv-budget", "0.3", "--prompt", "hi")
    assert r.returncode == 2 and "not both" in r.stderr


def test_seven_thousand_tokens_in_fifteen_hundred_tokens_of_memory(default_model: Path) -> None:
    """A 7,000-token document read with KV memory for ~1,500 uncompressed tokens.

    llama.cpp's KV allocation (regular cache + store buffers) is checked after every
    chunk and every generated token; pass keys at the start, middle and end must be
    found at least as often as with the full cache on the very same documents.
    """
    from spindle_local.eval.needle import NeedleBuilder, key_found, random_key
    from spindle_local.eval.texts import pydoc_text
    from spindle_local.runtime.chat_template import Detokenizer, eog_tokens
    from spindle_local.runtime.engine import Engine, EngineConfig, Sampler
    from spindle_local.runtime.lowlevel import LlamaModel

    model = LlamaModel(str(default_model))
    kv_mem = 1500 * SMOL_BYTES_PER_TOKEN
    comp = Engine(default_model, EngineConfig(kv_mem=kv_mem), model=model)
    full = Engine(default_model, EngineConfig(policy="full", n_cells=7168, max_tokens=7168), model=model)
    peak = [0]

    def check(*_: object) -> None:
        held, cap = comp.kv_memory()
        assert cap == kv_mem and held <= kv_mem, f"KV memory {held} > {kv_mem}"
        peak[0] = max(peak[0], held)

    def answer(eng: Engine, tokens: list[int], checked: bool) -> str:
        eng.reset()
        logits = eng.feed(tokens, progress=check if checked else None)
        detok, out = Detokenizer(model), []
        for tok in eng.generate(logits, max_tokens=8, sampler=Sampler(temperature=0.0), stop=eog_tokens(model)):
            out.append(detok.push(tok))
            if checked:
                check()
        return "".join(out) + detok.flush()

    builder = NeedleBuilder(lambda t: model.tokenize(t, add_special=False), model.token_to_piece, pydoc_text())
    rng = np.random.default_rng(0)
    found = found_full = 0
    try:
        for depth in (0.02, 0.5, 0.97):
            p = builder.build(7000, depth, random_key(rng))
            found += key_found(answer(comp, p.tokens, True), p.key)
            found_full += key_found(answer(full, p.tokens, False), p.key)
            assert comp.stats.compressions >= 10  # it really was read in bounded memory
    finally:
        comp.close()
        full.close()
    assert peak[0] > 0.8 * kv_mem  # the budget was used, not avoided
    assert found_full >= 1, "the full cache found no key: the test lost its meaning"
    assert found >= found_full


def test_chat_file_and_read(default_model: Path, tmp_path: Path) -> None:
    from spindle_local.eval.texts import pydoc_text

    doc = tmp_path / "notes.txt"
    doc.write_text(pydoc_text()[:6000] + "\nThe pass key is 48213.\n", encoding="utf-8")
    r = run_cli("chat", "--file", str(doc), "--kv-mem", "8MiB", "--temperature", "0", "--max-tokens", "4",
                "--prompt", "What is the pass key?")
    assert r.returncode == 0, r.stderr
    err = " ".join(r.stderr.split())  # notices are wrapped to the terminal width
    assert "[reading notes.txt:" in err and "tokens in" in err and "/8.0 MiB" in err
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    r = run_cli("chat", "--temperature", "0", "--max-tokens", "4",
                input=f"/read {tmp_path / 'missing.txt'}\n/read {bad}\n/read {doc}\n/stats\n")
    assert r.returncode == 0, r.stderr
    err = " ".join(r.stderr.split())  # notices are wrapped to the terminal width
    assert "error: document not found" in err and "is not UTF-8 text" in err
    assert "[reading notes.txt:" in err and "messages: 1" in err  # only the good document stayed
    r = run_cli("chat", "--file", str(tmp_path / "missing.txt"), "--prompt", "hi")
    assert r.returncode == 2 and r.stderr.strip() == f"error: document not found: {tmp_path / 'missing.txt'}"
