"""A KV memory budget in bytes (``--kv-mem``): how to split it between cache and store.

llama.cpp allocates the regular cache up front, in whole blocks of 256 cells; the
compressed store is allocated per layer as it is filled. With ``--kv-mem M`` the
engine sizes both so that (regular allocation + store buffers) never exceeds M:

* the regular cache gets about half of M (whole 256-cell blocks, at least one). It
  holds the newest tokens uncompressed and receives each prompt chunk; a larger share
  would delay compression (better windows) but shrink the store that keeps the past;
* the prompt chunk and the recent part are cut to fit that allocation: a chunk must fit
  after a compression has left ``recent`` tokens behind;
* the store may use what is left, minus an allowance for replacing one layer's store
  (the new buffer is allocated before the old one is freed) and buffer alignment.

A model with interleaved sliding-window attention (Gemma 3) has two caches: the global
layers' cache, which grows with the context and which the store serves, and the window
layers' cache, which llama.cpp keeps itself (:class:`WindowCache`). The window layers'
cache is taken off M first; the rest is split as above, with the bytes per token of the
global layers only.

Nothing here loads llama.cpp: the CLI refuses an impossible value before loading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spindle_local.errors import UsageError

if TYPE_CHECKING:
    from spindle_local.runtime.gguf_meta import ModelMeta

CELL_BLOCK = 256  # llama.cpp pads the cache allocation to a multiple of this many cells
MIN_STORE_TOKENS = 64  # smallest store worth having: sinks plus a few dozen tokens (raw rows)
ALIGN_SLACK_PER_LAYER = 4096  # per-tensor alignment of the store's backend buffers, generously
STORE_UBATCH = 256  # largest ubatch of a context that may hold a store
#: bytes per cached value of llama.cpp's cache types (q8_0: 34 bytes per 32 values, q4_0: 18)
CACHE_VALUE_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
# llama.cpp's layer pattern of the interleaved sliding-window architectures when the GGUF
# has no ``attention.sliding_window_pattern``: with pattern p, layer il is a window layer
# unless il % p == p - 1
SWA_PATTERNS = {"gemma3": 6, "gemma2": 2, "cohere2": 4}

_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30}


def parse_size(text: str) -> int:
    """``'64MiB'`` → 67108864. Accepts B, KiB, MiB, GiB (also K, M, G), case-insensitive."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", text or "")
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"cannot read {text!r} as a size: use a number with KiB, MiB or GiB (e.g. 64MiB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise UsageError(f"a size must be positive, got {text!r}")
    return int(value)


def format_size(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


def _blocks(n: int) -> int:
    return -(-n // CELL_BLOCK) * CELL_BLOCK


@dataclass(frozen=True)
class WindowCache:
    """The window layers' cache of an interleaved sliding-window model, as llama.cpp sizes it.

    Those layers attend to their last ``n_swa`` tokens only, and llama.cpp reuses the cells
    of older tokens as a ring: the cache has ``n_swa + ubatch`` cells, padded to whole
    blocks, at most the context's (contexts are created with llama.cpp's ``swa_full`` off,
    as llama.cpp's own tools do). A context that outgrows its cells (older tokens in the
    store) needs that many cells in the global layers too, or a full window leaves no room
    for a ubatch.
    """

    bytes_per_cell: int  # one cell of every window layer, K and V, in the cache's type
    n_swa: int
    ubatch: int

    def cells(self, n_ctx: int) -> int:
        """Cells llama.cpp allocates per window layer for a context of ``n_ctx`` cells."""
        return _blocks(min(n_ctx, self.n_swa + self.ubatch))

    def nbytes(self, n_ctx: int) -> int:
        return self.cells(n_ctx) * self.bytes_per_cell

    def min_ctx(self) -> int:
        """The fewest context cells with which the window layers can keep reading past them."""
        return _blocks(self.n_swa + self.ubatch)


@dataclass(frozen=True)
class KvShape:
    """What a model's KV cache costs: bytes per token of the layers whose cache grows with
    the context (the layers the store serves), and the window layers' cache, if any."""

    bytes_per_token: int
    n_layer: int
    window_cache: WindowCache | None = None

    def cost(self, cells: int) -> int:
        """Bytes llama.cpp allocates for a context of ``cells`` cells (window layers included)."""
        return cells * self.bytes_per_token + (self.window_cache.nbytes(cells) if self.window_cache else 0)

    def min_cells(self) -> int:
        """The fewest regular-cache cells a context whose older tokens go to a store may have."""
        return max(CELL_BLOCK, self.window_cache.min_ctx()) if self.window_cache else CELL_BLOCK


def window_layer_ids(meta: ModelMeta) -> list[int]:
    """The layers llama.cpp gives a sliding-window cache, from the GGUF metadata (none
    without a sliding window). An unknown layout yields none: every layer is then counted
    as global, which can only over-estimate the cache."""
    if not meta.sliding_window:
        return []
    from spindle_local.runtime.gguf_meta import read_header

    pattern = read_header(meta.path).get(f"{meta.architecture}.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # one flag per layer
        return [il for il, swa in enumerate(pattern[:meta.n_layer]) if swa]
    if pattern is None:
        pattern = SWA_PATTERNS.get(meta.architecture)
    if pattern is None:
        return []
    p = int(pattern)
    return [il for il in range(meta.n_layer) if p == 0 or il % p < p - 1]


def kv_shape(meta: ModelMeta, *, ubatch: int) -> KvShape:
    """The :class:`KvShape` of a model (f16 cache) for contexts with this ``ubatch``."""
    per_layer = meta.n_head_kv * (meta.head_dim_k + meta.head_dim_v) * 2
    swa = window_layer_ids(meta)
    n_global = meta.n_layer - len(swa)
    if not swa or n_global == 0:
        return KvShape(meta.n_layer * per_layer, meta.n_layer)
    cache = WindowCache(bytes_per_cell=len(swa) * per_layer, n_swa=int(meta.sliding_window),
                        ubatch=ubatch)
    return KvShape(n_global * per_layer, n_global, cache)


@dataclass(frozen=True)
class MemoryLayout:
    """How ``kv_mem`` bytes are spent: regular-cache cells, prompt chunk, recent part, store cap."""

    kv_mem: int
    cells: int
    chunk: int
    recent: int
    regular_bytes: int  # what llama.cpp allocates for ``cells`` cells of the layers the store serves
    store_cap: int  # store bytes (storage formula) the plans may use
    window_bytes: int = 0  # what llama.cpp allocates for the window layers' cache


def _store_cap(avail: int, n_layer: int) -> int:
    # A layer's store is replaced by allocating the new buffer before freeing the old one:
    # keep room for about two layers' worth on top of the plans' target.
    return int((avail - n_layer * ALIGN_SLACK_PER_LAYER) * n_layer / (n_layer + 2))


def smallest_kv_mem(bytes_per_token: int, n_layer: int, window_cache: WindowCache | None = None) -> int:
    """The smallest ``kv_mem`` that works: the fewest cells (one block, or what the window
    layers need), the window layers' cache for them, and a ``MIN_STORE_TOKENS`` store."""
    shape = KvShape(bytes_per_token, n_layer, window_cache)
    store = MIN_STORE_TOKENS * bytes_per_token
    # invert _store_cap: cap = (avail - slack)·L/(L+2) >= store
    return shape.cost(shape.min_cells()) + n_layer * ALIGN_SLACK_PER_LAYER + -(-store * (n_layer + 2) // n_layer)


def _too_small(kv_mem: int, low: int, shape: KvShape, model_name: str) -> UsageError:
    cells = shape.min_cells()
    window = (f", the window layers' {format_size(shape.window_cache.nbytes(cells))} cache"
              if shape.window_cache else "")
    return UsageError(f"--kv-mem {format_size(kv_mem)} is too small for {model_name}: the smallest workable "
                      f"value is {format_size(low)} ({cells} regular-cache cells{window} and a "
                      f"{MIN_STORE_TOKENS}-token store)")


def _split_cells(kv_mem: int, shape: KvShape, recent: int, chunk: int) -> int:
    """Regular-cache cells under ``kv_mem`` when the context does not fit whole: about half of
    what the window layers' fixed cache leaves, at most ``recent + chunk``, and never so many
    that the store is left less than the minimum."""
    low = shape.min_cells()
    fixed = shape.cost(low) - low * shape.bytes_per_token  # the window layers' cache
    half = (kv_mem - fixed) // 2 // shape.bytes_per_token
    cells = max(low, half // CELL_BLOCK * CELL_BLOCK)
    cells = max(low, min(cells, _blocks(recent + chunk)))
    while cells > low and _store_cap(kv_mem - shape.cost(cells), shape.n_layer) < \
            MIN_STORE_TOKENS * shape.bytes_per_token:
        cells -= CELL_BLOCK
    return cells


def plan_memory(kv_mem: int, *, bytes_per_token: int, n_layer: int, window: int, recent: int, chunk: int,
                max_tokens: int, model_name: str = "this model",
                window_cache: WindowCache | None = None) -> MemoryLayout:
    """Split ``kv_mem`` bytes between the regular cache and the store (see the module doc).

    ``bytes_per_token`` and ``n_layer`` are those of the layers the store serves; a
    sliding-window model's window layers are described by ``window_cache``.
    """
    shape = KvShape(bytes_per_token, n_layer, window_cache)
    low = smallest_kv_mem(bytes_per_token, n_layer, window_cache)
    if kv_mem < low:
        raise _too_small(kv_mem, low, shape, model_name)
    longest = _blocks(max(max_tokens, 1))
    if kv_mem >= shape.cost(longest):
        # everything fits uncompressed: allocate the whole context, the store stays empty
        cells = longest
    else:
        cells = _split_cells(kv_mem, shape, recent, chunk)
    rec = max(window, min(recent, cells // 2))
    if rec + 16 > cells:
        raise UsageError(f"--window {window} does not fit in the {cells} regular-cache cells that --kv-mem "
                         f"{format_size(kv_mem)} allows; use a smaller --window or a larger --kv-mem")
    ch = max(16, min(chunk, cells - rec))
    regular = cells * bytes_per_token
    window_bytes = window_cache.nbytes(cells) if window_cache else 0
    cap = max(0, _store_cap(kv_mem - regular - window_bytes, n_layer))
    return MemoryLayout(kv_mem=kv_mem, cells=cells, chunk=ch, recent=rec, regular_bytes=regular, store_cap=cap,
                        window_bytes=window_bytes)


def plan_full_memory(kv_mem: int, *, bytes_per_token: int, max_tokens: int, chunk: int,
                     window_cache: WindowCache | None = None, model_name: str = "this model") -> MemoryLayout:
    """The largest full cache (``--policy full``) within ``kv_mem``: whole blocks of cells,
    the window layers' cache included, at most the longest context; no store."""
    shape = KvShape(bytes_per_token, 1, window_cache)
    cells = min(_blocks(max(max_tokens, 1)), kv_mem // bytes_per_token // CELL_BLOCK * CELL_BLOCK)
    while cells >= CELL_BLOCK and shape.cost(cells) > kv_mem:
        cells -= CELL_BLOCK
    if cells < CELL_BLOCK:
        window = " with the window layers' cache" if window_cache else ""
        raise UsageError(f"--kv-mem {format_size(kv_mem)} holds no full cache of {model_name}: the smallest is "
                         f"{format_size(shape.cost(CELL_BLOCK))} ({CELL_BLOCK} cells{window})")
    return MemoryLayout(kv_mem=kv_mem, cells=cells, chunk=chunk, recent=cells, regular_bytes=cells * bytes_per_token,
                        store_cap=0, window_bytes=window_cache.nbytes(cells) if window_cache else 0)


def plan_model_memory(meta: ModelMeta, kv_mem: int, *, policy: str, window: int, recent: int, chunk: int,
                      max_tokens: int, model_name: str | None = None) -> MemoryLayout:
    """:func:`plan_memory` (or :func:`plan_full_memory` for ``policy`` full) for a model, from
    its metadata: the engine and the CLI's check before loading use this one function."""
    name = model_name or meta.name or meta.path
    if policy == "full":
        shape = kv_shape(meta, ubatch=chunk)  # a full cache reads a prompt chunk per ubatch
        return plan_full_memory(kv_mem, bytes_per_token=shape.bytes_per_token, max_tokens=max_tokens, chunk=chunk,
                                window_cache=shape.window_cache, model_name=name)
    shape = kv_shape(meta, ubatch=min(chunk, STORE_UBATCH))  # the store's ubatch is at most this
    return plan_memory(kv_mem, bytes_per_token=shape.bytes_per_token, n_layer=shape.n_layer, window=window,
                       recent=recent, chunk=chunk, max_tokens=max_tokens, model_name=name,
                       window_cache=shape.window_cache)
