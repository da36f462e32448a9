"""Reading a GGUF file's header without loading the model.

Used to refuse bad files with a clear message before llama.cpp sees them (llama.cpp
only says "failed to load"), and to print a model's attention geometry cheaply.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spindle_local.errors import ModelError
from spindle_local.runtime.model_files import check_gguf_path

if TYPE_CHECKING:
    from spindle_local.policy.inputs import Geometry

@dataclass
class ModelMeta:
    """Attention geometry and identity of a GGUF model, read from its metadata."""

    path: str
    architecture: str
    name: str
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_embd: int
    n_ctx_train: int
    rope_freq_base: float | None
    sliding_window: int | None
    file_type: int | None
    # per-frequency RoPE factors (``rope_freqs.weight``, Llama 3.1 style scaling): the engine
    # reads them (read_rope_factors) for the host-side RoPE of policy/rope.py
    rope_factors: bool = False

    @property
    def attention(self) -> Geometry:
        """The attention shape as the policy layer describes it."""
        from spindle_local.policy.inputs import Geometry

        return Geometry(self.n_layer, self.n_head, self.n_head_kv, self.head_dim_k, self.head_dim_v)

    @property
    def kv_bytes_per_token_f16(self) -> int:
        """Bytes one token occupies in a full f16 llama.cpp KV cache (all layers, K and V)."""
        return self.n_layer * self.n_head_kv * (self.head_dim_k + self.head_dim_v) * 2

    @property
    def compressible(self) -> bool:
        from spindle_local.runtime.support import model_support

        return model_support(self).kind == "compressed"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kv_bytes_per_token_f16"] = self.kv_bytes_per_token_f16
        d["compressible"] = self.compressible
        return d


# GGUF value types (gguf spec): scalar struct formats, 8 = string, 9 = array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_WANTED_ARRAY_MAX = 4096  # arrays longer than this (vocabularies) are skipped, not decoded


class _Truncated(Exception):
    pass


class _HeaderReader:
    """Reads the key/value section of a GGUF header and nothing else.

    Why not gguf.GGUFReader: it also parses every tensor descriptor and the whole
    vocabulary (1.6 s for SmolLM2); the CLI only needs a dozen numbers, before loading.
    """

    def __init__(self, f: Any):
        self.f = f

    def _read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise _Truncated()
        return b

    def _unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self._read(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        n = self._unpack("<Q")
        if n > 1 << 24:
            raise ValueError("implausible string length")
        return self._read(n).decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self._unpack(_SCALAR[vtype])
        if vtype == 8:
            return self._string()
        if vtype == 9:
            etype = self._unpack("<I")
            count = self._unpack("<Q")
            if count > 1 << 28:
                raise ValueError("implausible array length")
            if count > _WANTED_ARRAY_MAX:
                if etype in _SCALAR:
                    self.f.seek(count * struct.calcsize(_SCALAR[etype]), 1)
                else:
                    for _ in range(count):
                        self._value(etype)
                return None
            return [self._value(etype) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {vtype}")

    def read(self) -> dict[str, Any]:
        if self._read(4) != b"GGUF":
            raise ValueError("bad magic")
        version = self._unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        self.n_tensors = self._unpack("<Q")
        n_kv = self._unpack("<Q")
        if n_kv > 1 << 20 or self.n_tensors > 1 << 24:
            raise ValueError("implausible metadata count")
        out: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            out[key] = self._value(self._unpack("<I"))
        return out

    def data_end(self, alignment: int) -> int:
        """Where the last tensor's data ends (bytes from the file start); call after :meth:`read`.

        Reads the tensor descriptors that follow the key/values: a file cut anywhere in
        its tensor data has an intact header, and only this tells it is incomplete.
        """
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        end = 0
        self.tensor_names: list[str] = []
        for _ in range(self.n_tensors):
            self.tensor_names.append(self._string())
            n_dims = self._unpack("<I")
            if n_dims > 8:
                raise ValueError("implausible tensor rank")
            shape = [self._unpack("<Q") for _ in range(n_dims)]
            ttype = self._unpack("<I")
            offset = self._unpack("<Q")
            if self.tensor_names[-1] == ROPE_FACTORS and ttype == 0:  # F32
                self.rope_factors_at = (offset, int(np.prod(shape)))
            try:
                block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise ValueError(f"unknown tensor type {ttype}") from None
            n = 1
            for d in shape:
                n *= d
            end = max(end, offset + n // block * size)
        start = -(-self.f.tell() // alignment) * alignment
        self.data_start = start
        return start + end


TENSOR_NAMES = "spindle.tensor_names"  # key under which read_header lists the tensors' names
ROPE_FACTORS = "rope_freqs.weight"


def read_rope_factors(path: str | Path) -> np.ndarray | None:
    """The model's per-frequency RoPE factors (F32 ``rope_freqs.weight``), or None without them."""
    p = check_gguf_path(path)
    with open(p, "rb") as f:
        reader = _HeaderReader(f)
        kv = reader.read()
        reader.data_end(kv.get("general.alignment") or 32)
        at = getattr(reader, "rope_factors_at", None)
        if at is None:
            return None
        f.seek(reader.data_start + at[0])
        return np.frombuffer(f.read(4 * at[1]), dtype="<f4").astype(np.float32)


def read_header(path: str | Path) -> dict[str, Any]:
    """The metadata key/values of a GGUF file (long arrays such as the vocabulary omitted),
    and the tensors' names under :data:`TENSOR_NAMES`."""
    p = check_gguf_path(path)
    try:
        with open(p, "rb") as f:
            reader = _HeaderReader(f)
            kv = reader.read()
            alignment = kv.get("general.alignment") or 32
            if not isinstance(alignment, int) or alignment <= 0:
                raise ValueError(f"bad general.alignment {alignment!r}")
            need, size = reader.data_end(alignment), p.stat().st_size
            if size < need:
                raise ModelError(f"truncated GGUF file ({size:,} bytes; its tensors need {need:,}): {p}")
            kv[TENSOR_NAMES] = reader.tensor_names
            return kv
    except _Truncated:
        raise ModelError(f"truncated GGUF file (header ends early): {p}") from None
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise ModelError(f"corrupt GGUF file ({e}): {p}") from None


def read_meta(path: str | Path) -> ModelMeta:
    """Read a GGUF's metadata; raise ModelError with one line if it is not usable."""
    p = check_gguf_path(path)
    kv = read_header(p)
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelError(f"GGUF file has no general.architecture: {p}")
    from spindle_local.runtime.support import check_not_refused

    check_not_refused(arch)

    def get(name: str, default: Any = None) -> Any:
        v = kv.get(f"{arch}.{name}")
        return default if v is None else v

    n_layer = get("block_count")
    n_head = get("attention.head_count")
    n_embd = get("embedding_length")
    if n_layer is None or n_head is None or n_embd is None:
        raise ModelError(f"GGUF file lacks the attention geometry of a language model ({arch}): {p}")
    n_head_kv = get("attention.head_count_kv", n_head)
    # Some models give per-layer head counts; the cache geometry uses the maximum.
    if isinstance(n_head, list):
        n_head = max(n_head)
    if isinstance(n_head_kv, list):
        n_head_kv = max(n_head_kv)
    head_dim = n_embd // n_head
    return ModelMeta(
        path=str(p),
        architecture=arch,
        name=str(kv.get("general.name") or p.stem),
        n_layer=int(n_layer),
        n_head=int(n_head),
        n_head_kv=int(n_head_kv),
        head_dim_k=int(get("attention.key_length", head_dim)),
        head_dim_v=int(get("attention.value_length", head_dim)),
        n_embd=int(n_embd),
        n_ctx_train=int(get("context_length", 0)),
        rope_freq_base=get("rope.freq_base"),
        sliding_window=get("attention.sliding_window"),
        file_type=kv.get("general.file_type"),
        rope_factors=ROPE_FACTORS in kv.get(TENSOR_NAMES, ()),
    )
