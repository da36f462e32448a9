"""The policies the engine can run side by side: full, streaming, snapkv, pyramidkv, spindle.

Every policy plans one :class:`LayerStore` per layer and guarantees
``sum(layer_store_bytes(...)) <= target_bytes`` (the only exception is ``full``, which
keeps everything and ignores the budget: it is the reference run). Sinks (position <
``config.sinks``) are kept in every layer; when ``target_bytes`` cannot even hold them a
ValueError says how many bytes are needed.

Plans stream over layers (:mod:`.sources`): a first pass scores each layer and keeps only
its scores and token positions; the cross-layer decisions (byte shares, copy spans,
salient runs, slot allocation) read those; a second pass reloads each layer, builds its
store and hands it to ``install`` at once. At no time does a plan hold more than one
layer's vectors per planning thread.

After a plan the policy's ``last_report`` lists, per layer, the role, token count,
slots and bytes (``spindle`` adds the layer's byte share ``share_bytes`` and, with
``auto``, the measured errors ``err_evict``/``err_codebook``), for logs and benchmarks.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Callable, Sequence

import numpy as np

from .anchors import anchor_strength, boost, copy_spans
from .budgets import allocate_slots, mass_slots, pyramid_weights, raw_slot_bytes, sink_slots
from .inputs import Geometry, LayerInput, PolicyConfig
from .layer_plans import evict_layer, fit_codebook_layer, head_store, layer_gains, protect
from .parallel import pmap
from .plan import LayerStore, layer_store_bytes
from .roles import RoleMemory, decide_role
from .salience import salient_positions
from .scores import attn_scale, layer_logits, pool_window_scores, raw_window_scores, window_scores
from .sources import LayerMeta, LayerSource, ListSource

POLICY_NAMES = ("full", "streaming", "snapkv", "pyramidkv", "spindle")

Install = Callable[[int, LayerStore], None]
Put = Callable[[int, LayerMeta, LayerStore], None]
Layers = Sequence[LayerInput] | Sequence[LayerMeta]


class _Validated:
    """A source whose every loaded input is checked against the geometry."""

    def __init__(self, source: LayerSource, geometry: Geometry) -> None:
        self.source, self.geometry = source, geometry

    def __len__(self) -> int:
        return len(self.source)

    def load(self, i: int) -> LayerInput:
        inp = self.source.load(i)
        inp.validate(self.geometry)
        return inp


class Policy(ABC):
    """Turns captured layers into a plan within a byte budget."""

    name: str = ""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()
        self.last_report: list[dict] = []
        self._extra_report: dict[int, dict] = {}
        # Roles decided by earlier plans of the same conversation (the engine owns one per
        # conversation; None: every plan decides afresh, as for independent plan() calls).
        self.role_memory: RoleMemory | None = None

    def wants_salience(self) -> bool:
        """Whether plans read ``LayerInput.salient`` (the engine computes it only then)."""
        return False

    def plan(self, layers: list[LayerInput], geometry: Geometry, target_bytes: int) -> list[LayerStore]:
        """One LayerStore per entry of ``layers`` (same order), within ``target_bytes``."""
        out: list[LayerStore | None] = [None] * len(layers)

        def keep(i: int, st: LayerStore) -> None:
            out[i] = st

        self.plan_into(ListSource(layers), geometry, target_bytes, keep)
        return out  # type: ignore[return-value]

    def plan_into(self, source: LayerSource, geometry: Geometry, target_bytes: int, install: Install) -> int:
        """Plan the layers of ``source`` and ``install(i, store)`` each one as soon as it is final.

        Every layer is installed exactly once (not necessarily in order; calls never
        overlap). Returns the plan's total bytes.
        """
        self._extra_report = {}
        rows: list[dict | None] = [None] * len(source)
        total = [0]
        lock = threading.Lock()

        def put(i: int, meta: LayerMeta, st: LayerStore) -> None:
            b = layer_store_bytes(st, geometry.head_dim_k, geometry.head_dim_v)
            with lock:
                if rows[i] is not None:
                    raise AssertionError(f"{self.name}: layer {meta.layer} planned twice")
                total[0] += b
                rows[i] = {"layer": meta.layer, "role": st.role, "n": meta.n,
                           "slots": max((h.n_slots for h in st.heads), default=0), "bytes": b}
                install(i, st)

        self._plan_into(_Validated(source, geometry), geometry, int(target_bytes), put)
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            raise AssertionError(f"{self.name}: no plan for layers {missing}")
        self.last_report = [r | self._extra_report.get(r["layer"], {}) for r in rows]  # type: ignore[operator]
        if self.name != "full" and total[0] > target_bytes:  # a bug, never a user error
            raise AssertionError(f"{self.name}: plan uses {total[0]} bytes > target {target_bytes}")
        return total[0]

    @abstractmethod
    def _plan_into(self, source: LayerSource, geometry: Geometry, target_bytes: int, put: Put) -> None:
        ...

    # shared helpers -----------------------------------------------------------------
    def _each(self, fn: Callable[[int], object], n: int) -> list:
        """``[fn(i) for i in range(n)]`` on the planning threads (each holds one layer at a time)."""
        return pmap(fn, range(n), self.config.threads)

    def _slot_budget(self, layers: Layers, geometry: Geometry, target_bytes: int, weights: np.ndarray) -> np.ndarray:
        """Raw slots per layer following ``weights``; ValueError when sinks do not fit."""
        unit = raw_slot_bytes(geometry)
        lo = np.array([min(sink_slots(i.positions, self.config.sinks), i.n) for i in layers], dtype=np.int64)
        hi = np.array([i.n for i in layers], dtype=np.int64)
        need = int(lo.sum()) * unit
        if target_bytes < need:
            raise ValueError(
                f"{self.name}: target of {target_bytes} bytes cannot hold the {int(lo.sum())} sink "
                f"slots ({need} bytes needed at {unit} bytes per slot); raise the KV budget"
            )
        return allocate_slots(weights, lo, hi, target_bytes // unit)

    def _layer_weights(self, layers: Layers, geometry: Geometry) -> np.ndarray:
        """Pyramid weights indexed by each input's layer number (inputs may be a subset)."""
        w = pyramid_weights(geometry.n_layer, self.config.pyramid_beta)
        return np.array([w[min(max(i.layer, 0), geometry.n_layer - 1)] for i in layers])

    def _scores(self, inp: LayerInput, geometry: Geometry, logits=None, value_weight: bool = False) -> np.ndarray:
        s = window_scores(inp, geometry, self.config, logits=logits, value_weight=value_weight)
        return protect(s, inp.positions, self.config.sinks, inp.available_mask())

    def _raw_and_scores(self, inp: LayerInput, geometry: Geometry, logits=None,
                        value_weight: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(window attention before pooling, pooled scores) of one layer, both protected."""
        raw = raw_window_scores(inp, geometry, self.config, logits=logits, value_weight=value_weight)
        s = pool_window_scores(raw, inp, self.config)
        avail = inp.available_mask()
        return protect(raw, inp.positions, self.config.sinks, avail), protect(s, inp.positions, self.config.sinks, avail)


class FullPolicy(Policy):
    """Keeps every (available) token raw. Ignores the budget on purpose: it is the reference run."""

    name = "full"

    def _plan_into(self, source, geometry, target_bytes, put):
        def one(i: int) -> None:
            inp = source.load(i)
            st = LayerStore(layer=inp.layer, role="full")
            avail = inp.available_mask()
            for h in range(geometry.n_head_kv):
                sel = np.arange(inp.n) if avail is None else np.nonzero(avail[:, h])[0]
                mask = np.ones((geometry.g, len(sel)), dtype=bool)
                st.heads.append(head_store(inp, h, sel, mask))
            put(i, LayerMeta.of(inp), st)

        self._each(one, len(source))


class StreamingPolicy(Policy):
    """Sinks plus the most recent old tokens, the same number in every layer (StreamingLLM)."""

    name = "streaming"

    def _plan_into(self, source, geometry, target_bytes, put):
        metas = self._each(lambda i: LayerMeta.of(source.load(i)), len(source))
        slots = self._slot_budget(metas, geometry, target_bytes, np.ones(len(metas)))

        def one(i: int) -> None:
            inp = source.load(i)
            pos = np.asarray(inp.positions, dtype=np.float32)
            sc = protect(np.tile(pos, (geometry.n_head, 1)), inp.positions, self.config.sinks, inp.available_mask())
            put(i, metas[i], evict_layer(inp, geometry, sc, int(slots[i]), per_query_head=False))

        self._each(one, len(source))


class SnapKVPolicy(Policy):
    """Window scores averaged over the GQA group, the same budget in every layer."""

    name = "snapkv"

    def _weights(self, layers, geometry):
        return np.ones(len(layers))

    def _plan_into(self, source, geometry, target_bytes, put):
        def score(i: int):
            inp = source.load(i)
            return LayerMeta.of(inp), self._scores(inp, geometry)

        metas, scores = zip(*self._each(score, len(source))) if len(source) else ((), ())
        slots = self._slot_budget(metas, geometry, target_bytes, self._weights(metas, geometry))

        def one(i: int) -> None:
            inp = source.load(i)
            put(i, metas[i], evict_layer(inp, geometry, scores[i], int(slots[i]), per_query_head=False))

        self._each(one, len(source))


class PyramidKVPolicy(SnapKVPolicy):
    """SnapKV scores (group-averaged) with pyramid budgets: shallow layers keep more."""

    name = "pyramidkv"

    def _weights(self, layers, geometry):
        return self._layer_weights(layers, geometry)


class SpindlePolicy(Policy):
    """SpindleKV: codebook layers at the shallow end, eviction with adaptive budgets elsewhere.

    1. Every layer gets a byte share: flat with ``layer_alloc='flat'`` or ``'mass'``
       (default), the pyramid (``pyramid_beta``) with ``'pyramid'`` (the paper). Plain
       ``'mass'`` loses pass keys in short prompts at small budgets (a layer whose window
       attention is concentrated on a few tokens gets few slots, and the neighbours a
       retrieval copies from are dropped), so every layer keeps at least ``alloc_floor``
       of its flat share and at least ``alloc_min_slots`` slots (never more than the flat
       share): at small budgets on short prompts that is flat, elsewhere mass.
    2. Codebook layers (the first ``codebook_layers`` or, with ``'auto'``, those where the
       codebook's measured attention error beats eviction at equal bytes) evict in
       selection order and codebook K (pre-RoPE) and V to fit their share; a layer whose
       codebook keeps no more tokens than plain eviction stays an eviction layer.
    3. The bytes left go to the eviction layers: evenly with ``'flat'``; ``'mass'`` keeps
       the floor above in every layer and gives each further slot to the layer where it
       keeps the most window attention mass (a global top-k over layers); ``'pyramid'``
       uses the pyramid weights.
    4. Per KV head, tokens are chosen by ``gqa_select`` (default: the mean score over the
       group's query heads; ``'max'``: the best one; ``'union'``: the paper's round-robin
       over per-query-head top-k) with scores weighted by value norms (``value_weight``); with
       ``query_masks='own'`` each query head sees only its own top-k of the union.
    Every KV head of a layer keeps the same slot count: the store pads a layer's heads to
    its largest one, so unequal per-head budgets would cost bytes without keeping more.
    """

    name = "spindle"

    def _anchor_cap(self, slots: np.ndarray) -> int:
        """Tokens copy spans may take: a share of a layer's mean slots, at most ``anchor_tokens``.

        What a question points at (a key, a name) does not grow with the budget, so the
        absolute cap keeps spans from crowding out scored tokens at large budgets; the
        share keeps them from taking most of a small one.
        """
        cap = int(self.config.anchor_share * slots.mean())
        return cap if self.config.anchor_tokens is None else min(cap, int(self.config.anchor_tokens))

    def wants_salience(self) -> bool:
        return self.config.salient_share > 0

    def _salient(self, layers: Layers, raw: list[np.ndarray], slots: np.ndarray) -> np.ndarray:
        """Positions of salient runs (:mod:`.salience`) to protect in every layer, capped."""
        with_flags = [inp for inp in layers if inp.salient is not None and inp.n]
        if not with_flags:
            return np.zeros(0, np.int64)
        pos = np.concatenate([np.asarray(inp.positions, np.int64) for inp in with_flags])
        flags = np.concatenate([np.asarray(inp.salient, np.float64) for inp in with_flags])
        union, first = np.unique(pos, return_index=True)
        sal = flags[first]
        sal[union < self.config.sinks] = 0.0  # sinks are kept anyway
        u_pos, strength = anchor_strength(layers, raw, 0, self.config.sinks)
        aligned = np.zeros(len(union))
        found = np.searchsorted(u_pos, union)
        ok = (found < len(u_pos)) & (u_pos[np.minimum(found, len(u_pos) - 1)] == union)
        aligned[ok] = strength[found[ok]]
        cap = int(self.config.salient_share * slots.min())
        return salient_positions(union, sal, aligned, before=self.config.salient_before,
                                 after=self.config.salient_after, cap=cap)

    def _plan_into(self, source, geometry, target_bytes, put):
        cfg = self.config
        unit = raw_slot_bytes(geometry)
        mass = cfg.layer_alloc == "mass"

        # pass 1: scores and token positions of every layer (the vectors are dropped)
        def score(i: int):
            inp = source.load(i)
            raw, sc = self._raw_and_scores(inp, geometry, value_weight=cfg.value_weight)
            return LayerMeta.of(inp), raw, sc

        out = self._each(score, len(source))
        metas = [o[0] for o in out]
        raw = [o[1] for o in out]
        scores = [o[2] for o in out]
        del out

        # cross-layer decisions, from scores and positions only
        # "mass": byte shares start flat; the eviction layers' slots then follow the score mass
        flat = mass or cfg.layer_alloc == "flat"
        weights = np.ones(len(metas)) if flat else self._layer_weights(metas, geometry)
        slots = self._slot_budget(metas, geometry, target_bytes, weights)
        budgets = slots * unit
        n_min = np.array([min(sink_slots(m.positions, cfg.sinks), m.n) for m in metas], dtype=np.int64)
        self._extra_report = {m.layer: {"share_bytes": int(b)} for m, b in zip(metas, budgets)}
        if cfg.anchor_span > 0 and cfg.anchor_share > 0:
            first = geometry.n_layer // 2 if cfg.anchor_from is None else cfg.anchor_from
            # anchors from attention before pooling: max-pooling copies a target's score to
            # its neighbours, so a span could start a few tokens late and lose the first digit
            kept = copy_spans(metas, raw, first_layer=first, span=cfg.anchor_span,
                              cap=self._anchor_cap(slots), sinks=cfg.sinks,
                              min_share=cfg.anchor_min_share)
            scores = [boost(sc, m.positions, kept) if m.layer >= first else sc
                      for m, sc in zip(metas, scores)]
            for m in metas:
                if m.layer >= first:
                    self._extra_report[m.layer]["copy_span_tokens"] = int(len(kept))
        if cfg.salient_share > 0:
            kept = self._salient(metas, raw, slots)
            scores = [boost(sc, m.positions, kept) for m, sc in zip(metas, scores)]
            for m in metas:
                self._extra_report[m.layer]["salient_tokens"] = int(len(kept))
        del raw

        # pass 2a: codebook layers, shallowest first, one layer's vectors at a time
        planned: set[int] = set()
        used = 0

        def fit(i: int, inp: LayerInput, cache=None, layout=None) -> None:
            nonlocal used
            f = fit_codebook_layer(inp, geometry, cfg, scores[i], int(budgets[i]), int(n_min[i]),
                                   cache=cache, layout=layout)
            if f.store is not None:
                used += layer_store_bytes(f.store, geometry.head_dim_k, geometry.head_dim_v)
                planned.add(i)
                put(i, metas[i], f.store)

        if cfg.codebook_layers == "auto":
            scale = attn_scale(geometry, cfg)
            memory = self.role_memory
            for i in range(min(cfg.codebook_candidates(geometry.n_layer), len(metas))):
                layer = metas[i].layer
                prev = memory.get(layer, metas[i].n) if memory is not None else None
                if prev is not None:  # decided on at least half of these tokens: keep the role
                    self._extra_report[layer].update(err_evict=prev.err_evict, err_codebook=prev.err_codebook,
                                                     role_reused=True)
                    if prev.codebook:
                        fit(i, source.load(i), layout=prev.layout)
                    if i not in planned:
                        break
                    continue
                inp = source.load(i)
                lg = layer_logits(inp, geometry, cfg)
                dec = decide_role(inp, geometry, cfg, lg, int(budgets[i]), int(slots[i]), int(n_min[i]), scale)
                del lg
                self._extra_report[metas[i].layer].update(err_evict=dec.err_evict, err_codebook=dec.err_codebook)
                if memory is not None:
                    memory.put(layer, metas[i].n, dec)
                if dec.codebook:
                    fit(i, inp, dec.cache, dec.layout)
                del inp, dec
                if i not in planned and self._extra_report[metas[i].layer]["err_evict"] is not None:
                    break  # eviction wins here: deeper layers are even sparser
        else:
            for i, m in enumerate(metas):
                if m.layer < int(cfg.codebook_layers) and m.n > slots[i]:
                    fit(i, source.load(i))

        # pass 2b: the bytes left go to the eviction layers
        rest = [i for i in range(len(metas)) if i not in planned]
        if not rest:
            return
        lo = n_min[rest]
        hi = np.array([metas[i].n for i in rest], dtype=np.int64)
        total = (target_bytes - used) // unit
        s_rest = allocate_slots(weights[rest], lo, hi, total)
        if mass:
            floor = np.floor(cfg.alloc_floor * s_rest).astype(np.int64)
            floor = np.maximum(floor, np.minimum(s_rest, cfg.alloc_min_slots))
            gains = [layer_gains(scores[i], geometry.g, cfg.gqa_select, int(n_min[i])) for i in rest]
            s_rest = mass_slots(gains, lo, hi, floor, total)
        planned_slots = dict(zip(rest, (int(s) for s in s_rest)))
        for i, s in planned_slots.items():
            self._extra_report[metas[i].layer]["slots_planned"] = s

        def evict(i: int) -> None:
            st = evict_layer(source.load(i), geometry, scores[i], planned_slots[i], per_query_head=True,
                             union_visible=cfg.query_masks == "union", select=cfg.gqa_select)
            put(i, metas[i], st)

        pmap(evict, rest, cfg.threads)


_POLICIES = {
    "full": FullPolicy,
    "streaming": StreamingPolicy,
    "snapkv": SnapKVPolicy,
    "pyramidkv": PyramidKVPolicy,
    "spindle": SpindlePolicy,
}


def make_policy(name: str, config: PolicyConfig | None = None) -> Policy:
    """The policy called ``name`` (one of :data:`POLICY_NAMES`)."""
    try:
        cls = _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; valid names: {', '.join(POLICY_NAMES)}") from None
    return cls(config)
