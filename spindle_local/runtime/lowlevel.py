"""A thin, typed wrapper over llama-cpp-python's low-level API (``llama_cpp.llama_cpp``).

The engine drives decoding itself (explicit positions, moving tokens into the compressed
store between chunks), which the high-level ``llama_cpp.Llama`` class does not allow, so it
builds on :class:`LlamaModel` and :class:`LlamaContext` instead. Everything here works on
a stock llama-cpp-python too, except the store methods and :meth:`LlamaContext.read_layer_kv`
which need the spindle-local patch (see :mod:`spindle_local.runtime.native`).

llama.cpp logging is silenced by default; set ``SPINDLE_LLAMA_LOG=1`` to see it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

import llama_cpp.llama_cpp as C

from spindle_local.errors import ModelError, SpindleError
from spindle_local.runtime.devices import default_threads
from spindle_local.policy.plan import HeadStore, LayerStore
from spindle_local.runtime.heap import fix_mmap_threshold

# ggml types accepted for the regular cache (enum ggml_type values from ggml.h)
CACHE_TYPES: dict[str, int] = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "bf16": 30,
}

#: ``cb_eval(tensor, ask) -> bool``: ``tensor`` is a raw ``ggml_tensor *`` (int); see :class:`TensorView`.
EvalCallback = Callable[[int, bool], bool]

_backend_ready = False
_log_cb: Any = None  # keeps the ctypes callback alive


def _quiet_log(level: int, text: bytes, user_data: Any) -> None:  # noqa: ARG001
    return None


def init_backend() -> None:
    """Initialise llama.cpp once and silence its logging unless ``SPINDLE_LLAMA_LOG=1``."""
    global _backend_ready, _log_cb
    if _backend_ready:
        return
    fix_mmap_threshold()  # before llama.cpp allocates anything (see runtime/heap.py)
    if os.environ.get("SPINDLE_LLAMA_LOG", "") not in ("1", "true", "yes"):
        _log_cb = C.llama_log_callback(_quiet_log)
        C.llama_log_set(_log_cb, ctypes.c_void_p())
    C.llama_backend_init()
    _backend_ready = True


class LlamaModel:
    """A GGUF model loaded with ``llama_model_load_from_file``."""

    def __init__(self, path: str | os.PathLike[str], *, n_gpu_layers: int | None = None) -> None:
        init_backend()
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"model file not found: {self.path}")
        params = C.llama_model_default_params()
        if n_gpu_layers is not None:
            params.n_gpu_layers = n_gpu_layers
        model = C.llama_model_load_from_file(str(self.path).encode(), params)
        if not model:
            raise ModelError(f"llama.cpp could not load the model (corrupt or unsupported GGUF?): {self.path}")
        self.model = model
        self.vocab = C.llama_model_get_vocab(model)
        self.n_vocab: int = int(C.llama_vocab_n_tokens(self.vocab))
        self.n_layer: int = int(C.llama_model_n_layer(model))
        self.n_ctx_train: int = int(C.llama_model_n_ctx_train(model))

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text`` (with BOS when the model adds one and ``add_special``)."""
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (C.llama_token * n_max)()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            buf = (C.llama_token * -n)()
            n = C.llama_tokenize(self.vocab, data, len(data), buf, -n, add_special, parse_special)
        return list(buf[:n])

    def token_to_piece(self, token: int) -> str:
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")

    def close(self) -> None:
        if getattr(self, "model", None):
            C.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _cache_type(t: str | int) -> int:
    if isinstance(t, int):
        return t
    try:
        return CACHE_TYPES[t.lower()]
    except KeyError:
        raise SpindleError(f"unknown KV cache type {t!r} (choose from {', '.join(CACHE_TYPES)})") from None


class LlamaContext:
    """A llama.cpp context (KV cache + compute graph) on sequence 0.

    ``decode`` takes explicit positions so that the caller may keep going past the
    allocation once older tokens live in the compressed store.
    """

    def __init__(
        self,
        model: LlamaModel,
        *,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_ubatch: int = 512,
        n_threads: int | None = None,
        flash_attn: bool = False,
        type_k: str | int = "f16",
        type_v: str | int = "f16",
        cb_eval: EvalCallback | None = None,
    ) -> None:
        self.model = model
        params = C.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch, n_batch)
        params.n_seq_max = 1
        threads = n_threads or int(os.environ.get("SPINDLE_THREADS", "0")) or default_threads()
        self.n_threads = threads
        params.n_threads = threads
        params.n_threads_batch = threads
        params.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.type_k = _cache_type(type_k)
        params.type_v = _cache_type(type_v)
        params.no_perf = True
        # a sliding-window model's window layers get a ring of n_swa + ubatch cells, not a
        # cache as large as the context (llama.cpp's library default; its tools turn it off)
        params.swa_full = False
        self._cb = None
        if cb_eval is not None:
            self._cb = C.ggml_backend_sched_eval_callback(lambda t, ask, ud: bool(cb_eval(int(t or 0), bool(ask))))
            params.cb_eval = self._cb
            params.cb_eval_user_data = None
        ctx = C.llama_init_from_model(model.model, params)
        if not ctx:
            raise SpindleError(
                f"llama.cpp could not create a context (n_ctx={n_ctx}, flash_attn={flash_attn}, "
                f"type_k={type_k}, type_v={type_v})"
            )
        self.ctx = ctx
        self.n_ctx = int(C.llama_n_ctx(ctx))
        self.n_batch = n_batch
        self.flash_attn = flash_attn
        self.mem = C.llama_get_memory(ctx)
        self.n_vocab = model.n_vocab
        self._batch = C.llama_batch_init(n_batch, 0, 1)
        self._logits: np.ndarray | None = None
        self.next_pos = 0  # position after the last decoded token

    # -- decoding -------------------------------------------------------------------------

    def decode(
        self,
        tokens: Sequence[int],
        positions: Sequence[int] | np.ndarray | None = None,
        *,
        logits: Literal["last", "all", "none"] = "last",
    ) -> None:
        """Decode ``tokens`` on sequence 0 at ``positions`` (default: following ``next_pos``).

        Batches longer than ``n_batch`` are split. ``logits`` chooses which rows
        :meth:`logits` returns afterwards.
        """
        n = len(tokens)
        if n == 0:
            return
        if positions is None:
            pos = np.arange(self.next_pos, self.next_pos + n, dtype=np.int32)
        else:
            pos = np.asarray(positions, dtype=np.int32)
            if pos.shape != (n,):
                raise SpindleError(f"decode: {n} tokens but {pos.size} positions")
        rows: list[np.ndarray] = []
        b = self._batch
        for start in range(0, n, self.n_batch):
            end = min(n, start + self.n_batch)
            m = end - start
            b.n_tokens = m
            for i in range(m):
                b.token[i] = int(tokens[start + i])
                b.pos[i] = int(pos[start + i])
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = logits == "all" or (logits == "last" and start + i == n - 1)
            rc = C.llama_decode(self.ctx, b)
            if rc != 0:
                raise SpindleError(
                    f"llama_decode failed (code {rc}) at positions {int(pos[start])}..{int(pos[end - 1])}"
                    + ("; the KV cache is full" if rc == 1 else "")
                )
            if logits == "all":
                ptr = C.llama_get_logits(self.ctx)
                rows.append(np.ctypeslib.as_array(ptr, shape=(m, self.n_vocab)).copy())
        if logits == "all":
            self._logits = np.concatenate(rows, axis=0)
        elif logits == "last":
            ptr = C.llama_get_logits_ith(self.ctx, -1)
            self._logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        else:
            self._logits = None
        self.next_pos = int(pos[-1]) + 1

    def restore_logits(self, logits: np.ndarray) -> None:
        """Set what :meth:`logits` returns (a restored session's last logits)."""
        self._logits = np.asarray(logits, dtype=np.float32)

    def logits(self) -> np.ndarray:
        """Logits of the last :meth:`decode`: float32 [n_vocab] ("last") or [n, n_vocab] ("all")."""
        if self._logits is None:
            raise SpindleError("no logits: decode with logits='last' or 'all' first")
        return self._logits

    # -- regular cache ----------------------------------------------------------------------

    def seq_rm(self, p0: int = 0, p1: int = -1) -> bool:
        """Remove positions [p0, p1) of sequence 0 from the regular cache (p1 = -1: to the end)."""
        return bool(C.llama_memory_seq_rm(self.mem, 0, p0, p1))

    def clear(self) -> None:
        """Empty the regular cache (and, with the patch, the compressed store)."""
        C.llama_memory_clear(self.mem, True)
        self.next_pos = 0

    def pos_range(self) -> tuple[int, int]:
        """(min, max) position of sequence 0 in the regular cache; (-1, -1) when empty."""
        return int(C.llama_memory_seq_pos_min(self.mem, 0)), int(C.llama_memory_seq_pos_max(self.mem, 0))

    def kv_used(self) -> int:
        """Tokens of sequence 0 in the regular cache."""
        from spindle_local.runtime import native

        if native.is_patched():
            return native.kv_count(self, 0)
        p0, p1 = self.pos_range()
        return 0 if p1 < 0 else p1 - p0 + 1  # assumes contiguous positions on a stock runtime

    # -- read hooks (patched runtime) -------------------------------------------------------

    def geometry(self) -> Any:
        """:class:`~spindle_local.runtime.native.Geometry` of this model and context."""
        from spindle_local.runtime import native

        return native.get_geometry(self)

    def read_layer_kv(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Layer ``layer``'s cached K (post-RoPE) [n,Hkv,dk], V [n,Hkv,dv] (f32) and positions int32 [n]."""
        from spindle_local.runtime import native

        return native.read_layer_kv(self, layer, 0)

    # -- compressed store (patched runtime) -------------------------------------------------

    def store_set(self, layer: int, store: LayerStore) -> None:
        """Install or replace ``layer``'s compressed store (see :func:`native.store_set`)."""
        from spindle_local.runtime import native

        native.store_set(self, layer, store)

    def store_get(self, layer: int) -> LayerStore:
        """Read ``layer``'s store back (for re-compression)."""
        from spindle_local.runtime import native

        return native.store_get(self, layer)

    def store_clear(self, layer: int | None = None) -> None:
        """Clear one layer's store or all of them."""
        from spindle_local.runtime import native

        native.store_clear(self, layer)

    def store_bytes(self, layer: int | None = None) -> int:
        """Bytes held by the store (storage formula, = ``plan.layer_store_bytes``)."""
        from spindle_local.runtime import native

        return native.store_bytes(self, layer)

    def compact(self) -> int:
        """Move sequence 0's cells to the front of the regular cache, in position order.

        After old tokens left for the store, attention would otherwise keep scanning the
        whole allocation (llama.cpp attends over cells up to the highest one in use).
        """
        from spindle_local.runtime import native

        return native.compact(self)

    def cache_bytes(self) -> tuple[int, int]:
        """Regular cache: (bytes of the cells in use for sequence 0, bytes allocated)."""
        from spindle_local.runtime import native

        return native.cache_bytes(self)

    def evict(self, p0: int, p1: int) -> None:
        """Free the regular-cache cells of positions [p0, p1) (after their content went into the store)."""
        if not self.seq_rm(p0, p1):
            raise SpindleError(f"could not remove positions [{p0}, {p1}) from the KV cache")

    def move_to_store(self, p0: int, p1: int) -> None:
        """Move positions [p0, p1) losslessly into the store as raw rows, visible to every query head.

        The rows are appended to each layer's existing store (which must hold raw rows), then
        the cells are freed. A building block for tests and the ``full``/``streaming`` policies.
        """
        from spindle_local.runtime import native

        geo = self.geometry()
        for il, lg in enumerate(geo.layers):
            k, v, pos = native.read_layer_kv(self, il)
            sel = (pos >= p0) & (pos < p1)
            if not sel.any():
                continue
            old = native.store_get(self, il)
            heads = []
            for h in range(lg.n_head_kv):
                new = HeadStore(
                    positions=pos[sel].astype(np.int32),
                    qmask=np.ones((lg.group_size, int(sel.sum())), dtype=bool),
                    k_raw=k[sel, h],
                    v_raw=v[sel, h],
                )
                if old.heads:
                    o = old.heads[h]
                    if o.k_raw is None or o.v_raw is None:
                        raise SpindleError(f"move_to_store: layer {il} holds a codebook; append raw rows yourself")
                    new = HeadStore(
                        positions=np.concatenate([o.positions, new.positions]),
                        qmask=np.concatenate([o.qmask, new.qmask], axis=1),
                        k_raw=np.concatenate([o.k_raw, new.k_raw]),
                        v_raw=np.concatenate([o.v_raw, new.v_raw]),
                        count=None if o.count is None else np.concatenate(
                            [o.count, np.ones(new.n_slots, dtype=np.uint8)]),
                    )
                heads.append(new)
            native.store_set(self, il, LayerStore(layer=il, heads=heads, role="full"))
        self.evict(p0, p1)

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "ctx", None):
            C.llama_batch_free(self._batch)
            C.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> LlamaContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# -- eval-callback helpers --------------------------------------------------------------------


class _GgmlTensor(ctypes.Structure):
    """Leading fields of ``struct ggml_tensor`` (ggml.h of the pinned llama.cpp)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
    ]


class TensorView:
    """Read a ``ggml_tensor *`` seen by an eval callback (CPU/host buffers only; tests use it
    to check the read hooks against llama.cpp's own tensors, the engine never does)."""

    def __init__(self, ptr: int) -> None:
        self.t = _GgmlTensor.from_address(ptr)

    @property
    def name(self) -> str:
        return self.t.name.decode("utf-8", "replace")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(int(x) for x in self.t.ne)  # type: ignore[return-value]

    def numpy(self) -> np.ndarray:
        """A float32 copy, numpy shape reversed from ggml's (ne3, ne2, ne1, ne0)."""
        dtypes = {0: np.float32, 1: np.float16}
        if self.t.type not in dtypes:
            raise SpindleError(f"TensorView: unsupported tensor type {self.t.type} ({self.name})")
        dt = np.dtype(dtypes[self.t.type])
        ne = [int(x) for x in self.t.ne]
        nb = [int(x) for x in self.t.nb]
        span = sum((n - 1) * s for n, s in zip(ne, nb)) + dt.itemsize
        raw = (ctypes.c_char * span).from_address(self.t.data)
        flat = np.frombuffer(raw, dtype=dt, count=span // dt.itemsize)
        arr = np.lib.stride_tricks.as_strided(flat, shape=tuple(reversed(ne)), strides=tuple(reversed(nb)))
        return np.array(arr, dtype=np.float32)


class TensorCapture:
    """An eval callback that copies the tensors whose names are in ``names``.

    Pass ``capture`` as ``cb_eval`` to :class:`LlamaContext`; after a decode,
    ``capture.tensors["Kcur-3"]`` holds the last value of that node.
    """

    def __init__(self, names: set[str] | Callable[[str], bool]) -> None:
        self.want = names if callable(names) else names.__contains__
        self.tensors: dict[str, np.ndarray] = {}

    def __call__(self, ptr: int, ask: bool) -> bool:
        name = TensorView(ptr).name
        if ask:
            return bool(self.want(name))
        if self.want(name):
            self.tensors[name] = TensorView(ptr).numpy()
        return True
