"""Numba kernels that load on their first call.

``import numba`` costs about 64 MiB of process memory, and the first cached kernels
another 50-70 MiB (LLVM and the linked code). A compression whose layers are all scored
in the patch (no codebook layer) needs none of the large-array kernels, so the policy
layer must not pay for numba at import: :func:`lazy_njit` wraps a standalone kernel
(one that calls no other jitted function) and compiles it, from numba's on-disk cache
where present, the first time it is called.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

_lock = threading.Lock()


def lazy_njit(**options: Any) -> Callable[[Callable], Callable]:
    """``numba.njit(**options)`` applied at the kernel's first call instead of at import.

    The wrapper keeps the plain function as ``py_func``, like a numba dispatcher. Kernels
    that call other jitted functions cannot be wrapped (numba would see a Python
    function); those modules import numba themselves and are imported lazily.
    """

    def wrap(fn: Callable) -> Callable:
        compiled: list[Callable] = []

        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            if not compiled:
                with _lock:  # planning threads may reach a kernel at the same time
                    if not compiled:
                        from numba import njit

                        compiled.append(njit(**options)(fn))
            return compiled[0](*args)

        call.py_func = fn  # type: ignore[attr-defined]
        return call

    return wrap
