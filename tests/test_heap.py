"""The fixed mmap threshold (runtime/heap.py): large blocks go back to the system when freed."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, os, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "init":
    from spindle_local.runtime.lowlevel import init_backend
    init_backend()
size = 4 << 20
libc.free(libc.malloc(size))  # glibc's dynamic threshold rises past 4 MiB here ...
before = libc.mallinfo2().hblks
block = libc.malloc(size)     # ... so this block would come from the heap
print(libc.mallinfo2().hblks - before)
libc.free(block)
"""


def _mapped_blocks(mode: str, env: dict[str, str] | None = None) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env=env)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_blocks_stay_mapped_after_a_large_free() -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    assert _mapped_blocks("plain", env) == 0  # glibc's default: the freed block raised the threshold
    assert _mapped_blocks("init", env) == 1  # the runtime fixed it: the block is its own mapping
