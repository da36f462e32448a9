"""The devices computation runs on: the CPU cores ggml's threads get by default, the runtime's
libggml, and whether layers can leave the CPU.

llama.cpp places a model's layers on the GPU and RPC devices ggml has registered
(``--gpu-layers``, default all of them); without any, every layer, its cache and the
store's compression graphs run on the CPU, on the context's threads.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from spindle_local.errors import SpindleError

# ggml_backend_dev_type
DEVICE_CPU, DEVICE_GPU, DEVICE_IGPU = 0, 1, 2

_ggml: Any = None

SYSFS_CPU = Path("/sys/devices/system/cpu")


def default_threads(cpus: Iterable[int] | None = None, sysfs: Path = SYSFS_CPU) -> int:
    """ggml's thread count when none is asked for: the physical cores this process may run on.

    ggml's threads wait for one another at every graph node by spinning. A thread on a CPU
    the process may not use (a container's cpuset), or on the second hardware thread of a
    core another thread keeps busy, stalls all of them; llama.cpp's own tools default to the
    physical cores for the same reason. ``cpus``: the allowed CPUs (default: this process's
    affinity); cores are told apart by their ``thread_siblings_list`` in ``sysfs``. Where
    neither is known (not Linux), every logical CPU.
    """
    if cpus is None:
        try:
            cpus = os.sched_getaffinity(0)
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    cpus = sorted(cpus)
    cores = set()
    for c in cpus:
        try:
            cores.add((sysfs / f"cpu{c}" / "topology" / "thread_siblings_list").read_text().strip())
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def ggml_lib() -> Any:
    """libggml of the installed runtime (the one llama_cpp loads)."""
    global _ggml
    if _ggml is None:
        import llama_cpp

        libdir = Path(llama_cpp.__file__).resolve().parent / "lib"
        candidates = sorted(libdir.glob("libggml.so*")) + sorted(libdir.glob("libggml.dylib")) + sorted(
            libdir.glob("ggml.dll"))
        if not candidates:
            raise SpindleError(f"cannot find libggml in {libdir}; run `spindle-local setup`")
        import llama_cpp.llama_cpp  # noqa: F401  (loads libllama and its ggml first)

        lib = ctypes.CDLL(str(candidates[0]), mode=ctypes.RTLD_GLOBAL)
        lib.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
        lib.ggml_backend_reg_by_name.restype = ctypes.c_void_p
        lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        lib.ggml_backend_register.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_register.restype = None
        lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        _ggml = lib
    return _ggml


def offload_device_present() -> bool:
    """Has ggml registered a device other than the CPU (a GPU, an integrated GPU, an RPC
    server) that llama.cpp can place layers on?"""
    lib = ggml_lib()
    return bool(lib.ggml_backend_dev_by_type(DEVICE_GPU) or lib.ggml_backend_dev_by_type(DEVICE_IGPU))
