"""ggml's RPC backend: layers on other machines, and a server for this one.

``spindle-local rpc-server`` starts ggml's RPC server on this machine's CPU from the same
runtime; ``--rpc HOST:PORT[,HOST:PORT...]`` registers those servers as devices before a
model loads, and llama.cpp then places layers on them (``--gpu-layers``, default all). The
compressed store needs nothing more: its buffers, the captured window queries, the scores
and the gathers all live on each layer's own backend (``patches/README.md``).

The RPC protocol has no authentication or encryption: anyone who reaches the port can
run computations and read memory on the server. The server binds to 127.0.0.1 unless
``--host`` says otherwise, and warns when it does.
"""

from __future__ import annotations

import ctypes
import ipaddress
from typing import Any

from spindle_local.errors import SpindleError, UsageError
from spindle_local.runtime.devices import DEVICE_CPU, ggml_lib

_added: set[str] = set()  # endpoints registered in this process


def _rpc_reg() -> tuple[Any, int]:
    lib = ggml_lib()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise SpindleError("this runtime was built without ggml's RPC backend; run `spindle-local setup --force`")
    return lib, reg


def parse_endpoints(spec: str) -> list[str]:
    """``HOST:PORT[,HOST:PORT...]`` as a list; a UsageError names the first bad entry."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not (0 < int(port) < 65536):
            raise UsageError(f"--rpc: {item!r} is not HOST:PORT")
        out.append(f"{host}:{int(port)}")
    if not out:
        raise UsageError("--rpc: no servers given")
    return out


def add_servers(endpoints: list[str]) -> None:
    """Register RPC servers as devices (before a model loads); each once per process."""
    lib, reg = _rpc_reg()
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    if not fn:
        raise SpindleError("the RPC backend of this runtime cannot add servers")
    add = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(fn)
    for ep in endpoints:
        if ep in _added:
            continue
        server_reg = add(ep.encode())
        if not server_reg:
            raise SpindleError(f"cannot reach the RPC server at {ep}")
        lib.ggml_backend_register(server_reg)
        _added.add(ep)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(host: str, port: int, threads: int) -> None:
    """Run ggml's RPC server on this machine's CPU until the process ends (blocks)."""
    lib, reg = _rpc_reg()
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_start_server")
    if not fn:
        raise SpindleError("the RPC backend of this runtime cannot start a server")
    cpu = lib.ggml_backend_dev_by_type(DEVICE_CPU)
    if not cpu:
        raise SpindleError("no CPU device in this runtime")
    start = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                             ctypes.POINTER(ctypes.c_void_p))(fn)
    devices = (ctypes.c_void_p * 1)(cpu)
    start(f"{host}:{port}".encode(), None, threads, 1, devices)
