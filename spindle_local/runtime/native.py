"""ctypes declarations of the spindle-local patch to llama.cpp (``patches/0001-spindle-kv.patch``).

The patch exports ``llama_spindle_*`` C functions from the same ``libllama`` that
llama-cpp-python loads (``llama_cpp.llama_cpp._lib``). They are bound lazily on first use;
a library without them, or with another API version, raises
:class:`~spindle_local.errors.RuntimeNotPatchedError` with a one-line hint to run
``spindle-local setup``. See ``patches/README.md`` for the C API and the store format.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from spindle_local.errors import RuntimeNotPatchedError, SpindleError
from spindle_local.policy.inputs import Geometry as AttentionShape
from spindle_local.policy.plan import Codebook, HeadStore, LayerStore

#: The ``LLAMA_SPINDLE_API_VERSION`` this module was written against.
API_VERSION = 9

ERR_ARG = -1
ERR_UNSUPPORTED = -2
ERR_BUFFER = -3
ERR_ALLOC = -4
ERR_INTERNAL = -5


class NativeError(SpindleError):
    """A ``llama_spindle_*`` call failed; the message is llama_spindle_last_error()."""


class llama_spindle_geometry(ctypes.Structure):
    _fields_ = [
        ("n_layer", ctypes.c_int32),
        ("n_ctx_train", ctypes.c_int32),
        ("n_ctx", ctypes.c_int32),
        ("rope_type", ctypes.c_int32),
        ("n_ctx_orig_yarn", ctypes.c_int32),
        ("freq_base", ctypes.c_float),
        ("freq_scale", ctypes.c_float),
        ("ext_factor", ctypes.c_float),
        ("attn_factor", ctypes.c_float),
        ("beta_fast", ctypes.c_float),
        ("beta_slow", ctypes.c_float),
        ("swa_type", ctypes.c_int32),
        ("n_swa", ctypes.c_int32),
        ("flash_attn", ctypes.c_int32),
        ("v_trans", ctypes.c_int32),
        ("type_k", ctypes.c_int32),
        ("type_v", ctypes.c_int32),
    ]


class llama_spindle_layer_geometry(ctypes.Structure):
    _fields_ = [
        ("n_head", ctypes.c_int32),
        ("n_head_kv", ctypes.c_int32),
        ("n_embd_head_k", ctypes.c_int32),
        ("n_embd_head_v", ctypes.c_int32),
        ("n_rot", ctypes.c_int32),
        ("is_swa", ctypes.c_int32),
        ("has_kv", ctypes.c_int32),
        ("freq_base", ctypes.c_float),
        ("freq_scale", ctypes.c_float),
    ]


class llama_spindle_layer_data(ctypes.Structure):
    _fields_ = [
        ("n_slot", ctypes.c_int32),
        ("n_slot_head", ctypes.POINTER(ctypes.c_int32)),
        ("pos", ctypes.POINTER(ctypes.c_int32)),
        ("qmask", ctypes.POINTER(ctypes.c_uint8)),
        ("k_codebook", ctypes.c_int32),
        ("k_raw", ctypes.POINTER(ctypes.c_float)),
        ("k_n_entries", ctypes.POINTER(ctypes.c_int32)),
        ("k_entries", ctypes.POINTER(ctypes.c_float)),
        ("k_index", ctypes.POINTER(ctypes.c_int32)),
        ("k_mag", ctypes.POINTER(ctypes.c_float)),
        ("v_codebook", ctypes.c_int32),
        ("v_raw", ctypes.POINTER(ctypes.c_float)),
        ("v_n_entries", ctypes.POINTER(ctypes.c_int32)),
        ("v_entries", ctypes.POINTER(ctypes.c_float)),
        ("v_index", ctypes.POINTER(ctypes.c_int32)),
        ("v_mag", ctypes.POINTER(ctypes.c_float)),
    ]


class llama_spindle_layer_info(ctypes.Structure):
    _fields_ = [
        ("n_slot", ctypes.c_int32),
        ("n_head_kv", ctypes.c_int32),
        ("n_head", ctypes.c_int32),
        ("n_embd_head_k", ctypes.c_int32),
        ("n_embd_head_v", ctypes.c_int32),
        ("k_codebook", ctypes.c_int32),
        ("v_codebook", ctypes.c_int32),
        ("k_n_entries", ctypes.c_int32),
        ("v_n_entries", ctypes.c_int32),
    ]


_P = ctypes.c_void_p
_I32 = ctypes.c_int32
_I64 = ctypes.c_int64
_FP = ctypes.POINTER(ctypes.c_float)
_IP = ctypes.POINTER(ctypes.c_int32)

class llama_spindle_gather(ctypes.Structure):
    _fields_ = [
        ("n_slot", ctypes.c_int32),
        ("n_slot_head", ctypes.POINTER(ctypes.c_int32)),
        ("src", ctypes.POINTER(ctypes.c_int32)),
        ("qmask", ctypes.POINTER(ctypes.c_uint8)),
    ]


# name -> (argtypes, restype); every symbol must exist for the runtime to count as patched
_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "llama_spindle_api_version": ([], _I32),
    "llama_spindle_last_error": ([], ctypes.c_char_p),
    "llama_spindle_get_geometry": ([_P, ctypes.POINTER(llama_spindle_geometry)], _I32),
    "llama_spindle_get_layer_geometry": ([_P, _I32, ctypes.POINTER(llama_spindle_layer_geometry)], _I32),
    "llama_spindle_kv_count": ([_P, _I32], _I32),
    "llama_spindle_read_layer_kv": ([_P, _I32, _I32, _FP, _FP, _IP, _I32], _I32),
    "llama_spindle_store_set": ([_P, _I32, _I32, ctypes.POINTER(llama_spindle_layer_data)], _I32),
    "llama_spindle_store_info": ([_P, _I32, _I32, ctypes.POINTER(llama_spindle_layer_info)], _I32),
    "llama_spindle_store_get": ([_P, _I32, _I32, ctypes.POINTER(llama_spindle_layer_data)], _I32),
    "llama_spindle_store_clear": ([_P, _I32, _I32], _I32),
    "llama_spindle_store_bytes": ([_P, _I32, _I32], _I64),
    "llama_spindle_store_buffer_bytes": ([_P, _I32, _I32], _I64),
    "llama_spindle_cache_bytes": ([_P, _I32, ctypes.POINTER(_I64), ctypes.POINTER(_I64)], _I32),
    "llama_spindle_compact": ([_P, _I32], _I32),
    "llama_spindle_scratch_free": ([_P], _I64),
    "llama_spindle_compact_window": ([_P, _I32], _I32),
    "llama_spindle_seq_rm": ([_P, _I32, _I32, _I32], _I32),
    "llama_spindle_attn_scale": ([_P, _I32], ctypes.c_float),
    "llama_spindle_capture": ([_P, _I32, _I32], _I32),
    "llama_spindle_capture_read": ([_P, _I32, _FP, _I32], _I32),
    "llama_spindle_layer_scores": ([_P, _I32, _I32, _FP, _IP, _I32, ctypes.c_float, _FP, _FP, _FP, _FP, _IP, _I32], _I32),
    "llama_spindle_store_gather": ([_P, _I32, _I32, ctypes.POINTER(llama_spindle_gather)], _I32),
    "llama_spindle_install_crash_handler": ([ctypes.c_char_p], _I32),
}

_CRASH_HINT = (b"run `spindle-local setup` (it tests the runtime on this CPU and rebuilds it without "
               b"instruction sets that fault) and report the command if it happens again")

_HINT = "run `spindle-local setup` to build the patched runtime"


class Native:
    """The patch's C functions bound on one library object (normally ``llama_cpp.llama_cpp._lib``)."""

    def __init__(self, lib: Any) -> None:
        missing = [name for name in _SIGNATURES if not hasattr(lib, name)]
        if missing:
            raise RuntimeNotPatchedError(
                f"llama.cpp runtime is not patched for spindle-local (missing {missing[0]}); {_HINT}"
            )
        for name, (argtypes, restype) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = restype
            setattr(self, name[len("llama_") :], fn)
        version = int(self.spindle_api_version())
        if version != API_VERSION:
            raise RuntimeNotPatchedError(
                f"llama.cpp runtime has spindle-local patch API {version}, expected {API_VERSION}; {_HINT}"
            )
        self.lib = lib
        # A fatal signal in native code ends with one line on stderr and exit 128 + signal
        # instead of the shell's bare "Illegal instruction". SPINDLE_CRASH_HANDLER=0 leaves the
        # default action (core dumps, debuggers; the smoke test needs the real signal).
        if os.environ.get("SPINDLE_CRASH_HANDLER", "1") != "0":
            self.spindle_install_crash_handler(_CRASH_HINT)

    def last_error(self) -> str:
        msg = self.spindle_last_error()
        return msg.decode("utf-8", "replace") if msg else "unknown error"

    def check(self, rc: int, what: str) -> int:
        """Raise :class:`NativeError` (one line) for a negative return code."""
        if rc < 0:
            raise NativeError(f"{what}: {self.last_error()}")
        return rc


_native: Native | None = None


def native(lib: Any | None = None) -> Native:
    """The bound patch API; checks symbols and version once (or for ``lib`` when given)."""
    global _native
    if lib is not None:
        return Native(lib)
    if _native is None:
        import llama_cpp.llama_cpp as llama_cpp_mod

        _native = Native(llama_cpp_mod._lib)
    return _native


def is_patched() -> bool:
    """True when the loaded llama.cpp carries a compatible spindle-local patch."""
    try:
        native()
    except RuntimeNotPatchedError:
        return False
    return True


def ctx_ptr(ctx: Any) -> int | None:
    """A raw ``llama_context *`` from a :class:`~spindle_local.runtime.lowlevel.LlamaContext` or a ctypes pointer."""
    raw = getattr(ctx, "ctx", ctx)
    if isinstance(raw, ctypes.c_void_p):
        return raw.value
    if isinstance(raw, int):
        return raw
    return ctypes.cast(raw, ctypes.c_void_p).value


@dataclass(frozen=True)
class LayerGeometry:
    """One layer as the context lays it out: attention shape, RoPE, sliding window, cache."""

    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_rot: int
    is_swa: bool
    has_kv: bool
    freq_base: float
    freq_scale: float

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(n_head, n_head_kv, head_dim_k, head_dim_v)``."""
        return self.n_head, self.n_head_kv, self.head_dim_k, self.head_dim_v

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA)."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


@dataclass(frozen=True)
class Geometry:
    """What the context's graph uses: per-layer layout and the RoPE and cache parameters.

    The model's attention shape, as the policy sees it, is :meth:`attention` (a
    :class:`spindle_local.policy.inputs.Geometry`), derived from the layers.
    """

    n_layer: int
    n_ctx_train: int
    n_ctx: int
    rope_type: int
    n_ctx_orig_yarn: int
    freq_base: float
    freq_scale: float
    ext_factor: float
    attn_factor: float
    beta_fast: float
    beta_slow: float
    swa_type: int
    n_swa: int
    flash_attn: bool
    v_trans: bool
    type_k: int
    type_v: int
    layers: tuple[LayerGeometry, ...]

    def swa_layers(self) -> list[int]:
        """Layers that use a sliding window of ``n_swa`` tokens."""
        return [i for i, lg in enumerate(self.layers) if lg.is_swa]

    def attention(self, n_layer: int | None = None) -> AttentionShape:
        """The attention shape every layer shares, over ``n_layer`` layers (default: all).

        The engine passes the number of layers its store serves (the global layers of a
        sliding-window model). Raises ValueError when the layers differ in shape.
        """
        shapes = {lg.shape for lg in self.layers}
        if len(shapes) != 1:
            raise ValueError(f"layers differ in attention shape (n_head, n_head_kv, head_dim_k, head_dim_v): "
                             f"{sorted(shapes)}")
        n_head, n_head_kv, head_dim_k, head_dim_v = shapes.pop()
        return AttentionShape(n_layer=self.n_layer if n_layer is None else n_layer, n_head=n_head,
                              n_head_kv=n_head_kv, head_dim_k=head_dim_k, head_dim_v=head_dim_v)

    @property
    def n_head(self) -> int:
        return self.attention().n_head

    @property
    def n_head_kv(self) -> int:
        return self.attention().n_head_kv

    @property
    def head_dim_k(self) -> int:
        return self.attention().head_dim_k

    @property
    def head_dim_v(self) -> int:
        return self.attention().head_dim_v


def get_geometry(ctx: Any) -> Geometry:
    """Geometry of the model and context behind ``ctx``."""
    n = native()
    p = ctx_ptr(ctx)
    g = llama_spindle_geometry()
    n.check(n.spindle_get_geometry(p, ctypes.byref(g)), "geometry")
    layers = []
    for il in range(g.n_layer):
        lg = llama_spindle_layer_geometry()
        n.check(n.spindle_get_layer_geometry(p, il, ctypes.byref(lg)), f"geometry of layer {il}")
        layers.append(
            LayerGeometry(
                n_head=lg.n_head,
                n_head_kv=lg.n_head_kv,
                head_dim_k=lg.n_embd_head_k,
                head_dim_v=lg.n_embd_head_v,
                n_rot=lg.n_rot,
                is_swa=bool(lg.is_swa),
                has_kv=bool(lg.has_kv),
                freq_base=float(lg.freq_base),
                freq_scale=float(lg.freq_scale),
            )
        )
    return Geometry(
        n_layer=g.n_layer,
        n_ctx_train=g.n_ctx_train,
        n_ctx=g.n_ctx,
        rope_type=g.rope_type,
        n_ctx_orig_yarn=g.n_ctx_orig_yarn,
        freq_base=float(g.freq_base),
        freq_scale=float(g.freq_scale),
        ext_factor=float(g.ext_factor),
        attn_factor=float(g.attn_factor),
        beta_fast=float(g.beta_fast),
        beta_slow=float(g.beta_slow),
        swa_type=g.swa_type,
        n_swa=g.n_swa,
        flash_attn=bool(g.flash_attn),
        v_trans=g.v_trans == 1,
        type_k=g.type_k,
        type_v=g.type_v,
        layers=tuple(layers),
    )


def _fptr(a: np.ndarray) -> Any:
    return a.ctypes.data_as(_FP)


def _iptr(a: np.ndarray) -> Any:
    return a.ctypes.data_as(_IP)


def kv_count(ctx: Any, seq: int = 0) -> int:
    """Tokens of ``seq`` in the regular KV cache."""
    n = native()
    return n.check(n.spindle_kv_count(ctx_ptr(ctx), seq), "kv count")


def read_layer_kv(ctx: Any, layer: int, seq: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer's cached K (post-RoPE), V and positions for ``seq``, ordered by position.

    Returns ``k`` float32 [n, Hkv, dk], ``v`` float32 [n, Hkv, dv], ``pos`` int32 [n].
    """
    n = native()
    p = ctx_ptr(ctx)
    lg = llama_spindle_layer_geometry()
    n.check(n.spindle_get_layer_geometry(p, layer, ctypes.byref(lg)), f"geometry of layer {layer}")
    count = n.check(n.spindle_kv_count(p, seq), "kv count")
    k = np.empty((count, lg.n_head_kv, lg.n_embd_head_k), dtype=np.float32)
    v = np.empty((count, lg.n_head_kv, lg.n_embd_head_v), dtype=np.float32)
    pos = np.empty(count, dtype=np.int32)
    got = n.check(
        n.spindle_read_layer_kv(p, layer, seq, _fptr(k), _fptr(v), _iptr(pos), count),
        f"read layer {layer}",
    )
    return k[:got], v[:got], pos[:got]


# -- compressed store ----------------------------------------------------------------------------


def _layer_geometry(n: Native, p: int | None, layer: int) -> llama_spindle_layer_geometry:
    lg = llama_spindle_layer_geometry()
    n.check(n.spindle_get_layer_geometry(p, layer, ctypes.byref(lg)), f"geometry of layer {layer}")
    return lg


def _ptr(a: np.ndarray | None, ctype: Any) -> Any:
    return None if a is None else a.ctypes.data_as(ctypes.POINTER(ctype))


def store_set(ctx: Any, layer: int, store: LayerStore) -> None:
    """Install (or replace) ``layer``'s compressed store; an empty store clears it.

    All KV heads are padded to the largest head's slot count; padded slots are invisible.
    K and V each use raw rows or a codebook, the same form for every head of the layer.
    """
    n = native()
    p = ctx_ptr(ctx)
    lg = _layer_geometry(n, p, layer)
    H, Q, dk, dv = lg.n_head_kv, lg.n_head, lg.n_embd_head_k, lg.n_embd_head_v
    heads = store.heads
    if not heads or max(h.n_slots for h in heads) == 0:
        n.check(n.spindle_store_set(p, layer, 0, None), f"clear store of layer {layer}")
        return
    if len(heads) != H:
        raise SpindleError(f"store of layer {layer}: {len(heads)} heads given, the model has {H} KV heads")
    g = Q // H
    S = max(h.n_slots for h in heads)
    n_slot_head = np.array([h.n_slots for h in heads], dtype=np.int32)
    pos = np.zeros((H, S), dtype=np.int32)
    qmask = np.zeros((Q, S), dtype=np.uint8)
    for i, h in enumerate(heads):
        s_h = h.n_slots
        if h.qmask.shape != (g, s_h):
            raise SpindleError(f"store of layer {layer}, KV head {i}: qmask shape {h.qmask.shape}, expected {(g, s_h)}")
        pos[i, :s_h] = h.positions
        qmask[i * g : (i + 1) * g, :s_h] = h.visibility()

    arrays: dict[str, np.ndarray | None] = {}
    flags: dict[str, int] = {}
    for side, d in (("k", dk), ("v", dv)):
        use_cb = [getattr(h, f"{side}_codebook") is not None for h in heads]
        if any(use_cb) != all(use_cb):
            raise SpindleError(f"store of layer {layer}: {side.upper()} mixes raw rows and codebooks across heads")
        flags[side] = int(all(use_cb))
        if not flags[side]:
            raw = np.zeros((H, S, d), dtype=np.float32)
            for i, h in enumerate(heads):
                rows = getattr(h, f"{side}_raw")
                if rows is None or rows.shape != (h.n_slots, d):
                    got = None if rows is None else rows.shape
                    raise SpindleError(f"store of layer {layer}, KV head {i}: {side}_raw shape {got}, expected {(h.n_slots, d)}")
                raw[i, : h.n_slots] = rows
            arrays[f"{side}_raw"] = raw
            continue
        cbs: list[Codebook] = [getattr(h, f"{side}_codebook") for h in heads]
        for i, cb in enumerate(cbs):
            if cb.entries.ndim != 2 or cb.entries.shape[1] != d or cb.index.shape != (heads[i].n_slots,):
                raise SpindleError(f"store of layer {layer}, KV head {i}: bad {side.upper()} codebook shapes")
        arrays[f"{side}_n_entries"] = np.array([cb.n_entries for cb in cbs], dtype=np.int32)
        arrays[f"{side}_entries"] = np.ascontiguousarray(
            np.concatenate([cb.entries for cb in cbs], axis=0), dtype=np.float32
        )
        index = np.zeros((H, S), dtype=np.int32)
        mag = np.zeros((H, S), dtype=np.float32)
        for i, cb in enumerate(cbs):
            index[i, : heads[i].n_slots] = cb.index
            mag[i, : heads[i].n_slots] = cb.magnitude
        arrays[f"{side}_index"] = index
        arrays[f"{side}_mag"] = mag

    data = llama_spindle_layer_data()
    data.n_slot = S
    data.n_slot_head = _ptr(n_slot_head, ctypes.c_int32)
    data.pos = _ptr(pos, ctypes.c_int32)
    data.qmask = _ptr(qmask, ctypes.c_uint8)
    data.k_codebook = flags["k"]
    data.v_codebook = flags["v"]
    for side in ("k", "v"):
        setattr(data, f"{side}_raw", _ptr(arrays.get(f"{side}_raw"), ctypes.c_float))
        setattr(data, f"{side}_n_entries", _ptr(arrays.get(f"{side}_n_entries"), ctypes.c_int32))
        setattr(data, f"{side}_entries", _ptr(arrays.get(f"{side}_entries"), ctypes.c_float))
        setattr(data, f"{side}_index", _ptr(arrays.get(f"{side}_index"), ctypes.c_int32))
        setattr(data, f"{side}_mag", _ptr(arrays.get(f"{side}_mag"), ctypes.c_float))
    n.check(n.spindle_store_set(p, layer, 0, ctypes.byref(data)), f"store of layer {layer}")


def store_get(ctx: Any, layer: int) -> LayerStore:
    """Read ``layer``'s store back (f16 values as float32); no heads when it is empty."""
    n = native()
    p = ctx_ptr(ctx)
    info = llama_spindle_layer_info()
    n.check(n.spindle_store_info(p, layer, 0, ctypes.byref(info)), f"store info of layer {layer}")
    S, H, Q = info.n_slot, info.n_head_kv, info.n_head
    if S == 0:
        return LayerStore(layer=layer, heads=[])
    g = Q // H
    dims = {"k": info.n_embd_head_k, "v": info.n_embd_head_v}
    cb = {"k": bool(info.k_codebook), "v": bool(info.v_codebook)}
    n_entries = {"k": info.k_n_entries, "v": info.v_n_entries}
    n_slot_head = np.zeros(H, dtype=np.int32)
    pos = np.zeros((H, S), dtype=np.int32)
    qmask = np.zeros((Q, S), dtype=np.uint8)
    bufs: dict[str, np.ndarray] = {}
    for side in ("k", "v"):
        if cb[side]:
            bufs[f"{side}_n_entries"] = np.zeros(H, dtype=np.int32)
            bufs[f"{side}_entries"] = np.zeros((n_entries[side], dims[side]), dtype=np.float32)
            bufs[f"{side}_index"] = np.zeros((H, S), dtype=np.int32)
            bufs[f"{side}_mag"] = np.zeros((H, S), dtype=np.float32)
        else:
            bufs[f"{side}_raw"] = np.zeros((H, S, dims[side]), dtype=np.float32)
    data = llama_spindle_layer_data()
    data.n_slot = S
    data.n_slot_head = _ptr(n_slot_head, ctypes.c_int32)
    data.pos = _ptr(pos, ctypes.c_int32)
    data.qmask = _ptr(qmask, ctypes.c_uint8)
    for name, arr in bufs.items():
        ctype = ctypes.c_int32 if arr.dtype == np.int32 else ctypes.c_float
        setattr(data, name, _ptr(arr, ctype))
    n.check(n.spindle_store_get(p, layer, 0, ctypes.byref(data)), f"read store of layer {layer}")

    heads: list[HeadStore] = []
    offsets = {side: 0 for side in ("k", "v")}
    for h in range(H):
        s_h = int(n_slot_head[h])
        vis, count = HeadStore.split_visibility(qmask[h * g : (h + 1) * g, :s_h])
        head = HeadStore(positions=pos[h, :s_h].copy(), qmask=vis, count=count)
        for side in ("k", "v"):
            if cb[side]:
                e_h = int(bufs[f"{side}_n_entries"][h])
                o = offsets[side]
                book = Codebook(
                    entries=bufs[f"{side}_entries"][o : o + e_h].copy(),
                    index=bufs[f"{side}_index"][h, :s_h].copy(),
                    magnitude=bufs[f"{side}_mag"][h, :s_h].copy(),
                )
                offsets[side] = o + e_h
                setattr(head, f"{side}_codebook", book)
            else:
                setattr(head, f"{side}_raw", bufs[f"{side}_raw"][h, :s_h].copy())
        heads.append(head)
    role = "codebook" if (cb["k"] or cb["v"]) else "evict"
    return LayerStore(layer=layer, heads=heads, role=role)


def store_clear(ctx: Any, layer: int | None = None) -> None:
    """Clear one layer's store, or every layer's (``layer=None``)."""
    n = native()
    il = -1 if layer is None else layer
    n.check(n.spindle_store_clear(ctx_ptr(ctx), il, 0), "clear store")


def store_bytes(ctx: Any, layer: int | None = None) -> int:
    """Bytes the store holds by the storage formula (= ``layer_store_bytes``), one layer or all."""
    n = native()
    il = -1 if layer is None else layer
    return n.check(n.spindle_store_bytes(ctx_ptr(ctx), il, 0), "store bytes")


def store_buffer_bytes(ctx: Any, layer: int | None = None) -> int:
    """Bytes of the backend buffers the store allocated (alignment included) plus its host masks."""
    n = native()
    il = -1 if layer is None else layer
    return n.check(n.spindle_store_buffer_bytes(ctx_ptr(ctx), il, 0), "store buffer bytes")


def compact(ctx: Any, seq: int = 0) -> int:
    """Move the sequence's regular-cache cells to the front (see llama_spindle_compact)."""
    n = native()
    return n.check(n.spindle_compact(ctx_ptr(ctx), seq), "compact the KV cache")


def scratch_free(ctx: Any) -> int:
    """Free what the compression graphs keep allocated between calls; the bytes it held."""
    n = native()
    return n.check(n.spindle_scratch_free(ctx_ptr(ctx)), "free the compression scratch")


def compact_window(ctx: Any, seq: int = 0) -> int:
    """Lay out a sliding-window model's window cache as a restore of the sequence's saved
    state would (see llama_spindle_compact_window); 0 for a model without one."""
    n = native()
    return n.check(n.spindle_compact_window(ctx_ptr(ctx), seq), "compact the window cache")


def seq_rm(ctx: Any, p0: int, p1: int, seq: int = 0) -> None:
    """Remove positions [p0, p1) from the cache that holds the store only (a sliding-window
    model's window layers keep theirs; see llama_spindle_seq_rm)."""
    n = native()
    n.check(n.spindle_seq_rm(ctx_ptr(ctx), seq, int(p0), int(p1)), "remove positions from the KV cache")


def attn_scale(ctx: Any, layer: int) -> float:
    """The softmax scale layer ``layer``'s attention applies to q·k as the model graph sets it
    (1 for models that scale q beforehand); 0 before a graph with a store input was built."""
    return float(native().spindle_attn_scale(ctx_ptr(ctx), int(layer)))


def cache_bytes(ctx: Any) -> tuple[int, int]:
    """Regular cache: (bytes of the cells sequence 0 uses, bytes llama.cpp allocated)."""
    n = native()
    used = ctypes.c_int64()
    alloc = ctypes.c_int64()
    n.check(n.spindle_cache_bytes(ctx_ptr(ctx), 0, ctypes.byref(used), ctypes.byref(alloc)), "cache bytes")
    return int(used.value), int(alloc.value)


def capture(ctx: Any, rows: int) -> None:
    """Arm (``rows`` > 0) or stop (0) the window-query capture: each following ubatch copies its
    last ``rows`` post-RoPE query rows of every layer on the layer's backend."""
    n = native()
    n.check(n.spindle_capture(ctx_ptr(ctx), 0, int(rows)), "arm the query capture")


def capture_read(ctx: Any, layer: int, rows: int, n_head: int, head_dim: int) -> np.ndarray:
    """The query rows the last ubatch captured for ``layer``: float32 [m, n_head, head_dim], m <= rows."""
    n = native()
    out = np.empty((rows, n_head, head_dim), dtype=np.float32)
    m = n.check(n.spindle_capture_read(ctx_ptr(ctx), layer, _fptr(out), rows), f"read the queries of layer {layer}")
    return out[:m]


@dataclass
class LayerScores:
    """Window attention of one layer, computed where its KV lives (llama_spindle_layer_scores).

    ``slot_attn`` [Q, S] and ``cell_attn`` [Q, n_cells]: attention summed over the queries;
    ``slot_vnorm`` [Hkv, S], ``cell_vnorm`` [Hkv, n_cells]: value norms; ``cell_pos`` [n_cells]
    (-1: unused cell)."""

    slot_attn: np.ndarray
    slot_vnorm: np.ndarray
    cell_attn: np.ndarray
    cell_vnorm: np.ndarray
    cell_pos: np.ndarray


def layer_scores(ctx: Any, layer: int, q: np.ndarray, q_pos: np.ndarray, kq_scale: float,
                 n_slot: int, n_cells: int, slot_vnorm: np.ndarray | None = None) -> LayerScores:
    """:class:`LayerScores` of ``layer`` for queries ``q`` [n_q, Q, dk] at ``q_pos`` [n_q].

    ``slot_vnorm`` [Hkv, n_slot]: the store's value norms when the caller already knows them
    (the patch then reads none of the store's V rows); computed by the patch otherwise."""
    n = native()
    p = ctx_ptr(ctx)
    lg = _layer_geometry(n, p, layer)
    hq, hkv = lg.n_head, lg.n_head_kv
    q = np.ascontiguousarray(q, dtype=np.float32)
    q_pos = np.ascontiguousarray(q_pos, dtype=np.int32)
    if q.ndim != 3 or q.shape[1:] != (hq, lg.n_embd_head_k) or q.shape[0] != q_pos.shape[0]:
        raise ValueError(f"layer {layer}: queries of shape {q.shape} for positions {q_pos.shape}")
    sa = np.empty((hq, n_slot), np.float32)
    known = slot_vnorm is not None
    if known and slot_vnorm.shape != (hkv, n_slot):
        raise ValueError(f"layer {layer}: value norms of shape {slot_vnorm.shape} for {hkv} heads and {n_slot} slots")
    sv = slot_vnorm if known else np.empty((hkv, n_slot), np.float32)
    ca = np.empty((hq, n_cells), np.float32)
    cv = np.empty((hkv, n_cells), np.float32)
    cp = np.empty(n_cells, np.int32)
    got = n.check(n.spindle_layer_scores(p, layer, 0, _fptr(q), _iptr(q_pos), len(q_pos), float(kq_scale),
                                         _fptr(sa), None if known else _fptr(sv), _fptr(ca), _fptr(cv), _iptr(cp),
                                         n_cells),
                  f"scores of layer {layer}")
    if got != n_cells:
        raise NativeError(f"scores of layer {layer}: the cache has {got} cells, expected {n_cells}")
    return LayerScores(sa, sv, ca, cv, cp)


def store_gather(ctx: Any, layer: int, n_slot_head: np.ndarray, src: np.ndarray, qmask: np.ndarray) -> None:
    """Replace ``layer``'s store by raw rows gathered on its backend (llama_spindle_store_gather).

    ``src`` int32 [Hkv, S]: slot ``j < S_old`` of the same KV head in the current store, or
    ``S_old + cell`` of the regular cache; ``qmask`` [Q, S]; ``n_slot_head`` [Hkv]."""
    n = native()
    nsh = np.ascontiguousarray(n_slot_head, dtype=np.int32)
    src = np.ascontiguousarray(src, dtype=np.int32)
    qm = np.ascontiguousarray(qmask, dtype=np.uint8)
    g = llama_spindle_gather(int(src.shape[1]) if src.size else 0, _iptr(nsh), _iptr(src),
                             qm.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
    n.check(n.spindle_store_gather(ctx_ptr(ctx), layer, 0, ctypes.byref(g)), f"gather the store of layer {layer}")
