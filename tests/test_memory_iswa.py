"""--kv-mem for interleaved sliding-window models (Gemma 3): the window layers' cache comes
off the cap first, the global layers' regular cache and the store share the rest."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np
import pytest

from spindle_local.errors import UsageError
from spindle_local.runtime.memory import (
    CELL_BLOCK,
    MIN_STORE_TOKENS,
    KvShape,
    WindowCache,
    format_size,
    plan_full_memory,
    plan_memory,
    smallest_kv_mem,
)

MIB = 2**20
# Gemma 3 270M: global layers 5, 11, 17; 15 window layers of 512 tokens; 1 KV head of 256
GLOBAL_T = 3 * 1 * (256 + 256) * 2
WINDOW_CELL = 15 * 1 * (256 + 256) * 2


def _window(ubatch: int = 256) -> WindowCache:
    return WindowCache(bytes_per_cell=WINDOW_CELL, n_swa=512, ubatch=ubatch)


def _plan(kv_mem: int, wc: WindowCache, **kw) -> object:
    args = {"bytes_per_token": GLOBAL_T, "n_layer": 3, "window": 32, "recent": 256, "chunk": 512,
            "max_tokens": 32768, "window_cache": wc}
    return plan_memory(kv_mem, **{**args, **kw})


@pytest.mark.parametrize("mib", [12, 13.8, 14, 16, 20, 27, 40, 64, 200, 700])
def test_window_cache_comes_off_the_cap(mib: float) -> None:
    wc = _window()
    kv_mem = int(mib * MIB)
    low = smallest_kv_mem(GLOBAL_T, 3, wc)
    if kv_mem < low:
        with pytest.raises(UsageError, match=f"smallest workable value is {re.escape(format_size(low))}"):
            _plan(kv_mem, wc)
        return
    lay = _plan(kv_mem, wc)
    assert lay.cells % CELL_BLOCK == 0 and lay.cells >= 768  # the window and a ubatch: 512 + 256
    assert lay.regular_bytes == lay.cells * GLOBAL_T  # the global layers only
    assert lay.window_bytes == wc.nbytes(lay.cells)
    assert lay.regular_bytes + lay.window_bytes + lay.store_cap <= kv_mem
    assert lay.recent >= 32 and lay.recent + lay.chunk <= lay.cells
    if lay.cells < 32768:
        assert lay.store_cap >= MIN_STORE_TOKENS * GLOBAL_T


@pytest.mark.parametrize("ubatch, cells, window_bytes", [
    (256, 768, 768 * WINDOW_CELL),  # n_swa + ubatch, padded, at most the context's
    (256, 4096, 768 * WINDOW_CELL),
    (256, 512, 512 * WINDOW_CELL),
    (512, 32768, 1024 * WINDOW_CELL),
    (100, 4096, 768 * WINDOW_CELL),  # 612 cells, padded to whole blocks
])
def test_window_cache_size(ubatch: int, cells: int, window_bytes: int) -> None:
    assert _window(ubatch).nbytes(cells) == window_bytes


def test_smallest_value_is_the_boundary() -> None:
    wc = _window()
    low = smallest_kv_mem(GLOBAL_T, 3, wc)
    assert low > 768 * GLOBAL_T + wc.nbytes(768)  # the cells the window needs, its cache, a store
    assert _plan(low, wc).store_cap >= MIN_STORE_TOKENS * GLOBAL_T
    with pytest.raises(UsageError, match="window layers' 11.2 MiB cache") as e:
        _plan(low - 1, wc)
    assert "\n" not in str(e.value)


def test_the_window_is_not_counted_as_global_cache() -> None:
    """The same cap leaves the store of a sliding-window model less than a plain model of the
    same global layers by exactly the window layers' cache (times the replacement allowance)."""
    plain = plan_memory(40 * MIB, bytes_per_token=GLOBAL_T, n_layer=3, window=32, recent=256, chunk=512,
                        max_tokens=32768)
    swa = _plan(40 * MIB, _window())
    assert plain.cells == swa.cells
    assert plain.store_cap - swa.store_cap == pytest.approx(swa.window_bytes * 3 / 5, abs=2)


def test_everything_fits_uncompressed() -> None:
    wc = _window()
    cost = KvShape(GLOBAL_T, 3, wc).cost(4096)
    assert cost == 4096 * GLOBAL_T + 768 * WINDOW_CELL
    lay = _plan(cost, wc, max_tokens=4000)
    assert lay.cells == 4096 and lay.regular_bytes + lay.window_bytes == cost


@pytest.mark.parametrize("mib, cells", [
    (64, 16640),  # 64 MiB less 1024 window cells (ubatch 512), then 3072 per cell
    (4.5, 256),  # 256 cells of both
    (15, 768),  # 1024 cells would bring 1024 window cells
])
def test_full_cache_counts_the_window_layers(mib: float, cells: int) -> None:
    wc = _window(ubatch=512)
    lay = plan_full_memory(int(mib * MIB), bytes_per_token=GLOBAL_T, max_tokens=32768, chunk=512, window_cache=wc)
    assert lay.cells == cells and lay.store_cap == 0
    assert lay.regular_bytes + lay.window_bytes <= mib * MIB
    assert KvShape(GLOBAL_T, 3, wc).cost(cells + CELL_BLOCK) > mib * MIB  # the largest that fits


def test_full_cache_too_small() -> None:
    with pytest.raises(UsageError, match="holds no full cache .* the smallest is 4.5 MiB"):
        plan_full_memory(4 * MIB, bytes_per_token=GLOBAL_T, max_tokens=32768, chunk=512, window_cache=_window())


@pytest.fixture(scope="module")
def gemma3() -> Path:
    from spindle_local.runtime.model_files import bundled_model_path

    return bundled_model_path("gemma3", quiet=True)


@pytest.mark.model
def test_window_layers_from_the_header(gemma3: Path) -> None:
    from spindle_local.runtime.gguf_meta import read_meta
    from spindle_local.runtime.memory import kv_shape, window_layer_ids

    meta = read_meta(gemma3)
    assert window_layer_ids(meta) == [il for il in range(18) if il not in (5, 11, 17)]
    shape = kv_shape(meta, ubatch=256)
    assert (shape.bytes_per_token, shape.n_layer, shape.window_cache.bytes_per_cell) == (GLOBAL_T, 3, WINDOW_CELL)


def _llama_log_lines(lines: list[str]):
    """Route llama.cpp's log into ``lines`` (returns the callback, to keep it alive)."""
    import llama_cpp.llama_cpp as C

    cb = C.llama_log_callback(lambda level, text, ud: lines.append(text.decode(errors="replace")))
    C.llama_log_set(cb, ctypes.c_void_p())
    return cb


def _quiet_llama_log() -> None:
    import llama_cpp.llama_cpp as C

    from spindle_local.runtime import lowlevel

    C.llama_log_set(lowlevel._log_cb, ctypes.c_void_p()) if lowlevel._log_cb else C.llama_log_set(None, None)


@pytest.mark.model
def test_gemma3_reads_a_document_within_kv_mem(gemma3: Path) -> None:
    """3,000 tokens read and 32 generated under a 16 MiB cap (the full f16 cache of those
    tokens, as llama.cpp allocates it for Gemma 3, is about 53 MiB): llama.cpp's regular
    cache, window layers included, plus the store buffers stay within the cap at every
    chunk and token, and the window layers' cache is what llama.cpp reports creating."""
    from spindle_local.eval.texts import pydoc_text
    from spindle_local.runtime.engine import Engine, EngineConfig
    from spindle_local.runtime.lowlevel import LlamaModel

    kv_mem = 16 * MIB
    model = LlamaModel(str(gemma3))
    doc = model.tokenize(pydoc_text()[:20_000], add_special=True)[:3000]
    lines: list[str] = []
    cb = _llama_log_lines(lines)
    try:
        eng = Engine(gemma3, EngineConfig(kv_mem=kv_mem, n_threads=2), model=model)
    finally:
        _quiet_llama_log()
    del cb
    log = "".join(lines)
    window_cells = int(re.search(r"creating\s+SWA KV cache, size = (\d+) cells", log).group(1))
    global_cells = int(re.search(r"creating non-SWA KV cache, size = (\d+) cells", log).group(1))
    peak = [0]

    def check(*_: object) -> None:
        held, cap = eng.kv_memory()
        assert cap == kv_mem and held <= kv_mem, f"KV memory {held} > {kv_mem}: {eng.memory_parts()}"
        peak[0] = max(peak[0], held)

    try:
        parts = eng.memory_parts()
        assert global_cells == eng.cells == eng.layout.cells
        assert parts["window_cache_bytes"] == window_cells * WINDOW_CELL == eng.layout.window_bytes
        assert parts["regular_cache_bytes"] == global_cells * GLOBAL_T + window_cells * WINDOW_CELL
        logits = eng.feed(doc, progress=check)
        out = []
        for _ in range(32):
            tok = int(np.argmax(logits))
            out.append(tok)
            logits = eng.step(tok)
            check()
        assert eng.stats.compressions >= 3 and eng._store_layers and set(eng._store_layers) <= {5, 11, 17}
        assert eng.n_past == len(doc) + 32 and np.isfinite(logits).all()
        assert peak[0] > 0.8 * kv_mem  # the cap was used, not avoided
        assert len(set(out)) > 1  # still producing text, not one token over and over
    finally:
        eng.close()
        model.close()
