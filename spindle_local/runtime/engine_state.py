"""An engine's state as plain data: what a saved session and an undone read restore.

:meth:`Engine.state_dict` returns ``(info, arrays)``: a JSON-safe dict (cells, next
position, the last plan's allowance, the stores' roles, the counters) and numpy arrays
(tokens, llama.cpp's own per-sequence state of the regular cache, every layer's store
as positions, visibility masks and f16 rows or codebooks, the window queries, the last
logits). :meth:`Engine.load_state_dict` puts a fresh engine of the same model and
settings into that state. Session files (:mod:`.session`) add the conversation and the
model's identity around it; nothing else reads the engine's private fields.
"""

from __future__ import annotations

import ctypes
from dataclasses import asdict, fields
from typing import Any

import numpy as np

from spindle_local.errors import SpindleError
from spindle_local.policy.plan import Codebook, HeadStore, LayerStore
from spindle_local.runtime import native


class StateError(SpindleError):
    """A saved state this engine cannot take (another build's cache, a missing array)."""


#: llama.cpp's state flag for the window layers' cache alone (LLAMA_STATE_SEQ_FLAGS_SWA_ONLY)
WINDOW_ONLY = 1


def _regular_state(engine, flags: int = 0) -> np.ndarray:
    import llama_cpp.llama_cpp as C

    ctx = engine.ctx.ctx
    n = int(C.llama_state_seq_get_size_ext(ctx, 0, flags))
    buf = (ctypes.c_uint8 * n)()
    got = int(C.llama_state_seq_get_data_ext(ctx, buf, n, 0, flags))
    if got != n:
        raise SpindleError(f"llama.cpp wrote {got} of {n} bytes of the KV cache state")
    return np.frombuffer(buf, dtype=np.uint8).copy()


def _set_regular_state(engine, data: np.ndarray, flags: int = 0) -> None:
    import llama_cpp.llama_cpp as C

    raw = np.ascontiguousarray(data, dtype=np.uint8)
    buf = (ctypes.c_uint8 * raw.size).from_buffer_copy(raw.tobytes())
    if raw.size and int(C.llama_state_seq_set_data_ext(engine.ctx.ctx, buf, raw.size, 0, flags)) == 0:
        raise StateError("llama.cpp refused the saved KV cache (does the session fit this build's cache?)")


def window_state(engine) -> np.ndarray:
    """The window layers' ring of a sliding-window model, to return to with
    :func:`set_window_state`: the tokens the next position attends to in those layers.

    The ring reuses the cells of tokens its window has passed, and a truncation cannot bring
    them back; a transaction keeps this copy (``n_swa + ubatch`` cells at most) to return to
    its start. Laid out first as the restore will lay it out (:func:`_canonical_layout`).
    """
    native.compact_window(engine.ctx)
    return _regular_state(engine, WINDOW_ONLY)


def set_window_state(engine, data: np.ndarray) -> None:
    """Replace the window layers' ring with one :func:`window_state` returned (the global
    layers' cache and the store are left as they are)."""
    _set_regular_state(engine, data, WINDOW_ONLY)


def _put_side(out: dict, key: str, raw: np.ndarray | None, cb: Codebook | None) -> None:
    # Rows and codebook entries live as f16 in the store: f16 on disk loses nothing.
    if cb is not None:
        out[key + "_ent"] = cb.entries.astype(np.float16)
        out[key + "_idx"] = cb.index.astype(np.int32)
        out[key + "_mag"] = cb.magnitude.astype(np.float32)
    elif raw is not None:
        out[key + "_raw"] = raw.astype(np.float16)


def _get_side(arrays: dict, key: str) -> tuple[np.ndarray | None, Codebook | None]:
    if key + "_raw" in arrays:
        return arrays[key + "_raw"].astype(np.float32), None
    if key + "_ent" in arrays:
        return None, Codebook(entries=arrays[key + "_ent"].astype(np.float32), index=arrays[key + "_idx"],
                              magnitude=arrays[key + "_mag"])
    raise StateError(f"the session file lacks {key} (written by another version?)")


def _canonical_layout(engine) -> None:
    """Lay the live caches out as a restore of the state about to be read will lay them out.

    Attention sums over cells in cache order, and another order rounds differently: a
    resumed conversation gives the same logits as the uninterrupted one only when both
    caches hold the same tokens in the same cells and place later tokens alike. A restore
    writes the saved cells to the front of an empty cache, in the order they were saved;
    so the regular cache is compacted in position order, and a sliding-window model's
    window cache too, without the cells its window already masks (llama.cpp does not save
    those).
    """
    engine.ctx.compact()
    native.compact_window(engine.ctx)


def state_dict(engine) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(info, arrays)`` of ``engine`` (module docstring)."""
    arrays: dict[str, np.ndarray] = {"tokens": np.asarray(engine.tokens, dtype=np.int32)}
    if engine.tokens:
        _canonical_layout(engine)
        if engine.ctx._logits is not None:
            arrays["logits"] = np.asarray(engine.ctx.logits(), dtype=np.float32)
    arrays["regular"] = _regular_state(engine)
    q_pos, q_rows = engine.queries.snapshot()
    arrays["q_pos"] = q_pos
    arrays.update({f"q{il}": rows for il, rows in enumerate(q_rows) if rows is not None})
    stores = []
    for il in sorted(engine._store_layers):
        st = engine.ctx.store_get(il)
        stores.append({"layer": il, "role": st.role, "heads": len(st.heads)})
        for h, hs in enumerate(st.heads):
            key = f"s{il}_{h}"
            arrays[key + "_pos"] = hs.positions.astype(np.int32)
            arrays[key + "_qmask"] = hs.visibility()  # with the tokens each slot stands for
            _put_side(arrays, key + "_k", hs.k_raw, hs.k_codebook)
            _put_side(arrays, key + "_v", hs.v_raw, hs.v_codebook)
    info = {
        "cells": engine.cells,
        "next_pos": engine.ctx.next_pos,
        "allowance": engine._allowance,
        "stores": stores,
        "roles": engine.policy.role_memory.to_json(),
        "attn_scale": engine.graph_attn_scale,
        "stats": {k: v for k, v in asdict(engine.stats).items() if k != "extra"},
    }
    return info, arrays


def load_state_dict(engine, info: dict[str, Any], a: dict[str, np.ndarray]) -> None:
    """Put ``engine`` into the state :func:`state_dict` described (the engine is reset first;
    on failure it is left empty)."""
    from spindle_local.runtime.engine import EngineStats

    if info["cells"] != engine.cells:
        raise StateError(f"the saved state needs a {info['cells']}-cell cache, this engine has {engine.cells}")
    engine.reset()
    _set_regular_state(engine, a["regular"])
    try:
        for st in info["stores"]:
            il = int(st["layer"])
            heads = []
            for h in range(int(st["heads"])):
                key = f"s{il}_{h}"
                k_raw, k_cb = _get_side(a, key + "_k")
                v_raw, v_cb = _get_side(a, key + "_v")
                vis, count = HeadStore.split_visibility(a[key + "_qmask"])
                heads.append(HeadStore(positions=a[key + "_pos"], qmask=vis, count=count,
                                       k_raw=k_raw, k_codebook=k_cb, v_raw=v_raw, v_codebook=v_cb))
            engine.install_store(il, LayerStore(layer=il, heads=heads, role=st["role"]))
    except BaseException:
        engine.reset()
        raise
    engine.tokens = [int(t) for t in a["tokens"]]
    engine.ctx.next_pos = int(info["next_pos"])
    engine._allowance = info["allowance"]
    engine.policy.role_memory.load_json(info.get("roles", []))
    engine.graph_attn_scale = info.get("attn_scale")
    engine.queries.restore(a["q_pos"], [a.get(f"q{il}") for il in range(engine.queries.n_layer)])
    known = {f.name for f in fields(EngineStats)}
    engine.stats = EngineStats(**{k: v for k, v in info["stats"].items() if k in known})
    if "logits" in a:
        engine.ctx.restore_logits(a["logits"])
