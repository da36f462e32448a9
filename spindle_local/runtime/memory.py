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

Nothing here loads llama.cpp: the CLI refuses an impossible value before loading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from spindle_local.errors import UsageError

CELL_BLOCK = 256  # llama.cpp pads the cache allocation to a multiple of this many cells
MIN_STORE_TOKENS = 64  # smallest store worth having: sinks plus a few dozen tokens (raw rows)
ALIGN_SLACK_PER_LAYER = 4096  # per-tensor alignment of the store's backend buffers, generously

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


@dataclass(frozen=True)
class MemoryLayout:
    """How ``kv_mem`` bytes are spent: regular-cache cells, prompt chunk, recent part, store cap."""

    kv_mem: int
    cells: int
    chunk: int
    recent: int
    regular_bytes: int  # what llama.cpp allocates for ``cells`` cells
    store_cap: int  # store bytes (storage formula) the plans may use


def _blocks(n: int) -> int:
    return -(-n // CELL_BLOCK) * CELL_BLOCK


def _store_cap(avail: int, n_layer: int) -> int:
    # A layer's store is replaced by allocating the new buffer before freeing the old one:
    # keep room for about two layers' worth on top of the plans' target.
    return int((avail - n_layer * ALIGN_SLACK_PER_LAYER) * n_layer / (n_layer + 2))


def smallest_kv_mem(bytes_per_token: int, n_layer: int) -> int:
    """The smallest ``kv_mem`` that works: one block of cells and a ``MIN_STORE_TOKENS`` store."""
    regular = CELL_BLOCK * bytes_per_token
    store = MIN_STORE_TOKENS * bytes_per_token
    # invert _store_cap: cap = (avail - slack)·L/(L+2) >= store
    return regular + n_layer * ALIGN_SLACK_PER_LAYER + -(-store * (n_layer + 2) // n_layer)


def plan_memory(kv_mem: int, *, bytes_per_token: int, n_layer: int, window: int, recent: int, chunk: int,
                max_tokens: int, model_name: str = "this model") -> MemoryLayout:
    """Split ``kv_mem`` bytes between the regular cache and the store (see the module doc)."""
    low = smallest_kv_mem(bytes_per_token, n_layer)
    if kv_mem < low:
        raise UsageError(f"--kv-mem {format_size(kv_mem)} is too small for {model_name}: the smallest workable "
                         f"value is {format_size(low)} ({CELL_BLOCK} regular-cache cells and a "
                         f"{MIN_STORE_TOKENS}-token store)")
    longest = _blocks(max(max_tokens, 1))
    if kv_mem >= longest * bytes_per_token:
        # everything fits uncompressed: allocate the whole context, the store stays empty
        cells = longest
    else:
        half = kv_mem // 2 // bytes_per_token
        cells = max(CELL_BLOCK, half // CELL_BLOCK * CELL_BLOCK)
        cells = min(cells, _blocks(recent + chunk))
        # never leave the store less than the minimum
        while cells > CELL_BLOCK and _store_cap(kv_mem - cells * bytes_per_token, n_layer) < \
                MIN_STORE_TOKENS * bytes_per_token:
            cells -= CELL_BLOCK
    rec = max(window, min(recent, cells // 2))
    if rec + 16 > cells:
        raise UsageError(f"--window {window} does not fit in the {cells} regular-cache cells that --kv-mem "
                         f"{format_size(kv_mem)} allows; use a smaller --window or a larger --kv-mem")
    ch = max(16, min(chunk, cells - rec))
    regular = cells * bytes_per_token
    cap = max(0, _store_cap(kv_mem - regular, n_layer))
    return MemoryLayout(kv_mem=kv_mem, cells=cells, chunk=ch, recent=rec, regular_bytes=regular, store_cap=cap)
