"""Layers on a ggml RPC server on loopback (``spindle-local rpc-server``), started and stopped here.

Registering an RPC server is process-wide (every later model load would use it), so each
check runs in a child process: the same run with every layer local (``gpu_layers=0``) and
with every layer on the server, compared in that child. Over RPC the store, the captured
queries, the scores and the gathers live on the server; the logits must agree with the
local run to f16 precision, and a full-cache run over RPC must equal the local one.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spindle_local.runtime import rpc

pytestmark = pytest.mark.model  # every test here loads a model (or the patched library)

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def rpc_server():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "spindle_local.cli", "rpc-server", "--port", str(port),
                             "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"rpc-server exited: {proc.stderr.read()}")
            time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


_CHILD = r"""
import json, sys
import numpy as np
from spindle_local.eval.texts import pydoc_text
from spindle_local.runtime.config import EngineConfig
from spindle_local.runtime.engine import Engine
from spindle_local.runtime.model_files import default_model_path

endpoint, policy, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
path = default_model_path(quiet=True)
out = {}
for where in ("local", "rpc"):
    kw = dict(policy=policy, kv_budget=0.25, recent=256, chunk=256, n_threads=1, flash_attn=False, max_tokens=4096,
              n_cells=2048 if policy == "full" else 768)
    if where == "rpc":
        kw.update(rpc=(endpoint,))
    else:
        kw.update(gpu_layers=0)
    eng = Engine(path, EngineConfig(**kw))
    try:
        toks = eng.model.tokenize(pydoc_text()[:20000], add_special=False)[:n]
        first = eng.feed(toks[:-8])
        rows = [first]
        for t in toks[-8:]:
            rows.append(eng.step(t))
        st = eng.refresh_stats()
        out[where] = dict(logits=np.stack(rows).tolist(), compressions=st.compressions,
                          reserve=st.reserve_ratio, store_layers=sorted(eng._store_layers))
    finally:
        eng.close()
print(json.dumps(out))
"""


def _run(endpoint: str, policy: str, n: int) -> dict:
    r = subprocess.run([sys.executable, "-c", _CHILD, endpoint, policy, str(n)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_compressed_run_over_rpc_matches_local(rpc_server: str) -> None:
    import numpy as np

    out = _run(rpc_server, "spindle", 1400)
    loc, rem = out["local"], out["rpc"]
    assert loc["compressions"] >= 2 and rem["compressions"] == loc["compressions"]
    assert rem["store_layers"] == loc["store_layers"]
    assert abs(rem["reserve"] - loc["reserve"]) < 1e-9 and rem["reserve"] <= 0.25 + 1e-9
    a, b = np.asarray(loc["logits"]), np.asarray(rem["logits"])
    assert np.abs(a - b).max() < 5e-2, np.abs(a - b).max()
    assert (a.argmax(axis=1) == b.argmax(axis=1)).all()


def test_full_cache_over_rpc_equals_local(rpc_server: str) -> None:
    import numpy as np

    out = _run(rpc_server, "full", 600)
    a, b = np.asarray(out["local"]["logits"]), np.asarray(out["rpc"]["logits"])
    assert np.abs(a - b).max() < 1e-3, np.abs(a - b).max()


def test_endpoints_are_checked() -> None:
    from spindle_local.errors import UsageError

    assert rpc.parse_endpoints("127.0.0.1:50052, host:1") == ["127.0.0.1:50052", "host:1"]
    for bad in ("127.0.0.1", "host:port", ":80", "h:0", ""):
        with pytest.raises(UsageError):
            rpc.parse_endpoints(bad)
    assert rpc.is_loopback("127.0.0.1") and rpc.is_loopback("::1") and not rpc.is_loopback("0.0.0.0")


def test_rpc_servers_are_offload_devices(rpc_server: str) -> None:
    """Layers can leave the CPU once a server is registered, and before only in a runtime with a
    GPU backend: what decides how many threads plan beside the runtime's (policy/parallel.py)."""
    child = ("import sys; from spindle_local.runtime import devices, rpc; lib = devices.ggml_lib(); "
             "gpu = any(lib.ggml_backend_reg_by_name(n) for n in (b'CUDA', b'Vulkan', b'Metal', b'SYCL', b'HIP')); "
             "before = devices.offload_device_present(); "
             "rpc.add_servers([sys.argv[1]]); print(gpu, before, devices.offload_device_present())")
    r = subprocess.run([sys.executable, "-c", child, rpc_server], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    gpu, before, after = r.stdout.split()
    assert before == gpu and after == "True"
