"""The plan a policy hands to the runtime: what each layer's compressed store holds.

A policy never touches llama.cpp. It reads numpy arrays (a layer's keys, values,
positions and the window queries) and returns, per layer, one :class:`HeadStore` per KV
head. The runtime installs these into the patched llama.cpp store (see
``patches/README.md``). Shapes use ``S`` for the number of retained slots of that KV
head, ``g`` for the GQA group size (query heads per KV head), ``d`` for the head size.

Storage format and byte accounting are fixed here so that Python and C++ agree
(:func:`layer_store_bytes` must equal what ``llama_spindle_store_bytes`` reports):
all KV heads of a layer are padded to the same slot count ``S = max_h S_h``; per slot and
KV head the store keeps an int32 position and, per query head, a one-byte visibility
flag; raw K/V rows are f16; a codebook keeps f16 entries plus an int32 entry index and
an f32 magnitude per slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

F16_BYTES = 2
POS_BYTES = 4
MASK_BYTES = 1
INDEX_BYTES = 4
MAG_BYTES = 4


@dataclass
class Codebook:
    """Shared directions plus per-slot magnitudes: ``x_s ~= entries[index[s]] * magnitude[s]``.

    For keys the entries are *pre-RoPE* directions; the runtime re-applies RoPE at each
    slot's own position inside the graph.
    """

    entries: np.ndarray  # float32 [E, d], unit norm
    index: np.ndarray  # int32 [S], entry of each slot
    magnitude: np.ndarray  # float32 [S]

    def reconstruct(self) -> np.ndarray:
        """The vectors this codebook stands for, float32 [S, d]."""
        return self.entries[self.index] * self.magnitude[:, None].astype(np.float32)

    @property
    def n_entries(self) -> int:
        return int(self.entries.shape[0])


@dataclass
class HeadStore:
    """What one KV head of one layer keeps in the compressed store.

    Exactly one of ``k_raw``/``k_codebook`` and one of ``v_raw``/``v_codebook`` is set, or
    none of them and ``source`` instead: the slots are raw rows the runtime gathers where
    the KV lives (``source[s]`` in the runtime's numbering, see ``LayerInput.source``).
    ``qmask[j, s]`` is True when query head ``kv_head * g + j`` may attend slot ``s``:
    the union of the group's selections is stored once, each query head sees its own.
    """

    positions: np.ndarray  # int32 [S], ascending token positions
    qmask: np.ndarray  # bool [g, S]
    k_raw: np.ndarray | None = None  # float32 [S, dk], post-RoPE keys
    k_codebook: Codebook | None = None  # pre-RoPE directions
    v_raw: np.ndarray | None = None  # float32 [S, dv]
    v_codebook: Codebook | None = None
    token_index: np.ndarray | None = None  # int64 [S]: rows of the policy's input arrays
    source: np.ndarray | None = None  # int32 [S]: raw rows to gather (scored inputs)
    count: np.ndarray | None = None  # uint8 [S]: tokens each slot stands for in attention (None: 1 each)

    @property
    def n_slots(self) -> int:
        return int(self.positions.shape[0])

    def visibility(self) -> np.ndarray:
        """uint8 [g, S] as the runtime stores it: 0 where a query head does not see a slot,
        else the tokens the slot stands for (``log`` of it is added to the slot's logit)."""
        vis = np.asarray(self.qmask, dtype=np.uint8)
        if self.count is None:
            return vis
        return vis * np.asarray(self.count, dtype=np.uint8)[None, :]

    @classmethod
    def split_visibility(cls, vis: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(qmask, count)`` from a :meth:`visibility` array (count None when every slot is 1)."""
        vis = np.asarray(vis, dtype=np.uint8)
        count = vis.max(axis=0, initial=0)
        return vis > 0, (np.maximum(count, 1).astype(np.uint8) if (count > 1).any() else None)


@dataclass
class LayerStore:
    """The compressed store of one layer: one :class:`HeadStore` per KV head."""

    layer: int
    heads: list[HeadStore] = field(default_factory=list)
    role: str = "evict"  # "evict", "codebook", "evict+codebook" or "full": for reports only


def layer_store_bytes(store: LayerStore, d_k: int, d_v: int) -> int:
    """Bytes the patched llama.cpp holds for this layer's store (padding included)."""
    if not store.heads:
        return 0
    n_kv = len(store.heads)
    g = int(store.heads[0].qmask.shape[0])
    s_max = max(h.n_slots for h in store.heads)
    if s_max == 0:
        return 0
    total = n_kv * s_max * POS_BYTES + n_kv * g * s_max * MASK_BYTES
    for d, raw_attr, cb_attr in ((d_k, "k_raw", "k_codebook"), (d_v, "v_raw", "v_codebook")):
        if getattr(store.heads[0], cb_attr) is not None:
            n_entries = sum(getattr(h, cb_attr).n_entries for h in store.heads)
            total += n_entries * d * F16_BYTES + n_kv * s_max * (INDEX_BYTES + MAG_BYTES)
        else:
            total += n_kv * s_max * d * F16_BYTES
    return total


def full_cache_bytes(n_tokens: int, n_layer: int, n_kv_head: int, d_k: int, d_v: int) -> int:
    """Bytes an f16 llama.cpp KV cache needs for ``n_tokens`` tokens (the reserve-ratio denominator)."""
    return n_tokens * n_layer * n_kv_head * (d_k + d_v) * F16_BYTES
