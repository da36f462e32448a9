"""The ggml devices of the installed runtime: its libggml, and whether layers can leave the CPU.

llama.cpp places a model's layers on the GPU and RPC devices ggml has registered
(``--gpu-layers``, default all of them); without any, every layer, its cache and the
store's compression graphs run on the CPU, on the context's threads.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

from spindle_local.errors import SpindleError

# ggml_backend_dev_type
DEVICE_CPU, DEVICE_GPU, DEVICE_IGPU = 0, 1, 2

_ggml: Any = None


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
