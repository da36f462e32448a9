"""The C heap's policy for large blocks, set once per process.

glibc serves a ``malloc`` of 128 KiB or more with its own ``mmap`` and unmaps it on
``free`` -- until such a block is freed: then it raises that threshold to the block's size
(up to 32 MiB), and later blocks of that size come from the heap instead, where a freed
block stays resident until the memory above it is freed too. Compression allocates and
frees large blocks at every plan (a layer's new store buffer, the score and gather
graphs' buffers, the context's compute buffer when a wider store graph outgrows it), so
with the dynamic threshold their freed space accumulates in the heap: reading 8,000
tokens at ``--kv-budget 0.25`` peaked about 65 MiB higher than with the threshold fixed.
A fixed threshold (``mallopt(M_MMAP_THRESHOLD, ...)``, which also turns the adjustment
off) returns every large block to the system when it is freed.

Freed blocks below the threshold stay in the heap; :func:`release_free_memory` hands the
free pages among them back after a compression (the planner's numpy temporaries).

Nothing is changed when ``MALLOC_MMAP_THRESHOLD_`` is set in the environment (the user's
choice) or when the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 128 * 1024  # glibc's default starting threshold, kept fixed

_done = False
_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.gnu_get_libc_version, lib.mallopt, lib.malloc_trim  # noqa: B018  (glibc only)
        except (OSError, AttributeError):  # macOS, musl
            return None
        lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.mallopt.restype = ctypes.c_int
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        _libc = lib
    return _libc


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` bytes; True when it was set by this call."""
    global _done
    if _done or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    _done = True
    libc = _glibc()
    return libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (``malloc_trim``; nothing outside glibc)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
