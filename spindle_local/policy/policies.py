"""The policies the engine runs: ``full`` and the stage compositions of :mod:`.presets`.

Every policy plans one :class:`LayerStore` per layer and guarantees
``sum(layer_store_bytes(...)) <= target_bytes`` (the only exception is ``full``, which
keeps everything and ignores the budget: it is the reference run). Sinks (position <
``context.sinks``) are kept in every layer; when ``target_bytes`` cannot even hold them a
ValueError says how many bytes are needed.

Plans stream over layers (:mod:`.sources`): a first pass scores each layer and keeps only
its scores, token positions and per-token anchor strength (and the gather sources of a
layer scored where its KV lives); the cross-layer decisions (byte shares, copy spans,
salient runs, slot allocation) read those; a second pass builds each layer's store and
hands it to ``install`` at once, reloading only layers whose store is built from host
vectors. At no time does a plan hold more than one layer's vectors per planning thread.

After a plan the policy's ``last_report`` lists, per layer, the role, token count,
slots and bytes (staged policies add the layer's byte share ``share_bytes`` and, with
automatic codebook roles, the measured errors ``err_evict``/``err_codebook``), for logs
and benchmarks.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Callable, Sequence

import numpy as np

from .anchors import anchor_strength, boost, copy_spans, layer_strength
from .budgets import allocate_slots, mass_slots, pyramid_weights, raw_slot_bytes, sink_slots
from .inputs import Geometry, LayerInput
from .layer_plans import evict_layer, fit_codebook_layer, head_store, layer_gains, protect
from .parallel import pmap
from .mass import weigh_store
from .plan import LayerStore, layer_store_bytes
from .presets import PRESETS, Stages, apply_settings, preset
from .roles import RoleMemory, decide_role
from .salience import echo_marks, run_priority, salient_positions
from .scores import layer_logits, pool_window_scores, raw_window_scores
from .sources import LayerMeta, LayerSource, ListSource
from .stages import MassShares, PlanContext, PyramidShares, Recency

POLICY_NAMES = ("full", *PRESETS)

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

    def __init__(self, context: PlanContext | None = None) -> None:
        self.context = context or PlanContext()
        self.last_report: list[dict] = []
        self._extra_report: dict[int, dict] = {}
        # Roles decided by earlier plans of the same conversation (the engine owns one per
        # conversation; None: every plan decides afresh, as for independent plan() calls).
        self.role_memory: RoleMemory | None = None

    def wants_salience(self) -> bool:
        """Whether plans read ``LayerInput.salient`` (the engine computes it only then)."""
        return False

    def salient_priority(self, ids: np.ndarray, salient: np.ndarray) -> np.ndarray:
        """float [n]: run priority of the salient tokens ``salient`` (bool) of ``ids`` (:mod:`.salience`)."""
        return run_priority(ids, salient)

    def salient_marks(self, ids: np.ndarray, salient: np.ndarray) -> np.ndarray | None:
        """uint8 [n]: marks the plan needs beside the sentence marks (``ECHO`` on restated
        runs, :func:`~.salience.echo_marks`), or None: none."""
        return None

    def codebook_candidates(self, n_layer: int) -> int:
        """How many leading layers may become codebook layers (the engine reads ``k_pre`` for these)."""
        return 0

    def settings(self) -> dict:
        """The resolved settings (what results record next to their figures)."""
        return {"policy": self.name}

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

    def _each(self, fn: Callable[[int], object], n: int) -> list:
        """``[fn(i) for i in range(n)]`` on the planning threads that go beside the runtime (each
        holds one layer at a time, loaded from the runtime)."""
        return pmap(fn, range(n), self.context.runtime_pass_threads())


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


class StagedPolicy(Policy):
    """A policy run from its :class:`~.presets.Stages` (see :mod:`.stages` for the order).

    1. Every layer gets a byte share from the allocator (flat for ``MassShares``).
    2. The scorer rates every old token; boosters (copy spans, salient runs) raise the
       positions they name above any score.
    3. Codebook layers (the first ``codebooks.layers``, or with ``auto`` those where the
       codebook's measured attention error beats eviction at equal bytes) evict in
       selection order and codebook K (pre-RoPE) and V to fit their share; a layer whose
       codebook keeps no more tokens than plain eviction stays an eviction layer.
    4. The bytes left go to the eviction layers, following the allocator again.
    5. Per KV head, the selector picks the tokens and query-head masks.
    Every KV head of a layer keeps the same slot count: the store pads a layer's heads to
    its largest one, so unequal per-head budgets would cost bytes without keeping more.
    """

    def __init__(self, name: str, stages: Stages, context: PlanContext | None = None) -> None:
        super().__init__(context)
        self.name, self.stages = name, stages

    def wants_salience(self) -> bool:
        return self.stages.salient is not None and self.stages.salient.share > 0

    def salient_priority(self, ids: np.ndarray, salient: np.ndarray) -> np.ndarray:
        sr = self.stages.salient
        return run_priority(ids, salient, echo=0 if sr is None else sr.echo)

    def salient_marks(self, ids: np.ndarray, salient: np.ndarray) -> np.ndarray | None:
        sr = self.stages.salient
        if sr is None or not sr.echo_last or sr.echo <= 0:
            return None
        return echo_marks(ids, salient, sr.echo)

    def codebook_candidates(self, n_layer: int) -> int:
        cb = self.stages.codebooks
        return 0 if cb is None else cb.candidates(n_layer)

    def settings(self) -> dict:
        return {"policy": self.name, **self.stages.settings()}

    # -- stages ---------------------------------------------------------------------
    def _raw_and_scores(self, inp: LayerInput, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
        """(scores before pooling, pooled scores) of one layer, both protected."""
        sinks, avail, scorer = self.context.sinks, inp.available_mask(), self.stages.scorer
        if isinstance(scorer, Recency):
            pos = np.asarray(inp.positions, dtype=np.float32)
            s = protect(np.tile(pos, (geometry.n_head, 1)), inp.positions, sinks, avail)
            return s, s
        raw = raw_window_scores(inp, geometry, scorer, scale=self.context.attn_scale(geometry.head_dim_k))
        s = pool_window_scores(raw, inp, scorer, sinks=sinks)
        return protect(raw, inp.positions, sinks, avail), protect(s, inp.positions, sinks, avail)

    def _weights(self, layers: Layers, geometry: Geometry) -> np.ndarray:
        """The allocator's per-layer weights, indexed by each input's layer number."""
        alloc = self.stages.allocator
        if not isinstance(alloc, PyramidShares):
            return np.ones(len(layers))
        w = pyramid_weights(geometry.n_layer, alloc.beta)
        return np.array([w[min(max(i.layer, 0), geometry.n_layer - 1)] for i in layers])

    def _slot_budget(self, layers: Layers, geometry: Geometry, target_bytes: int, weights: np.ndarray) -> np.ndarray:
        """Raw slots per layer following ``weights``; ValueError when sinks do not fit."""
        unit = raw_slot_bytes(geometry)
        lo = np.array([min(sink_slots(i.positions, self.context.sinks), i.n) for i in layers], dtype=np.int64)
        hi = np.array([i.n for i in layers], dtype=np.int64)
        need = int(lo.sum()) * unit
        if target_bytes < need:
            raise ValueError(
                f"{self.name}: target of {target_bytes} bytes cannot hold the {int(lo.sum())} sink "
                f"slots ({need} bytes needed at {unit} bytes per slot); raise the KV budget"
            )
        return allocate_slots(weights, lo, hi, target_bytes // unit)

    def _copy_spans(self, metas, strengths, scores, slots, geometry) -> None:
        """Raise copy spans (:mod:`.anchors`) in ``scores`` of the layers that keep them (in place)."""
        cs = self.stages.copy_spans
        if cs is None or cs.span <= 0 or cs.share <= 0:
            return
        first = geometry.n_layer // 2 if cs.from_layer is None else cs.from_layer
        # What a question points at (a key, a name) does not grow with the budget, so the
        # absolute cap keeps spans from crowding out scored tokens at large budgets; the
        # share keeps them from taking most of a small one.
        cap = int(cs.share * slots.mean())
        cap = cap if cs.tokens is None else min(cap, int(cs.tokens))
        # anchors from attention before pooling: max-pooling copies a target's score to
        # its neighbours, so a span could start a few tokens late and lose the first digit
        kept = copy_spans(metas, strengths, first_layer=first, span=cs.span, cap=cap, min_share=cs.min_share)
        for i, m in enumerate(metas):
            if m.layer >= first:
                self._extra_report[m.layer]["copy_span_tokens"] = int(len(kept))
                scores[i] = boost(scores[i], m.positions, kept)

    def _salient(self, metas, strengths, scores, slots) -> None:
        """Raise salient runs (:mod:`.salience`) in every layer's ``scores``, capped (in place)."""
        sr = self.stages.salient
        if sr is None or sr.share <= 0:
            return
        sinks = self.context.sinks
        kept = np.zeros(0, np.int64)
        with_flags = [inp for inp in metas if inp.salient is not None and inp.n]
        if with_flags:
            pos = np.concatenate([np.asarray(inp.positions, np.int64) for inp in with_flags])
            flags = np.concatenate([np.asarray(inp.salient, np.float64) for inp in with_flags])
            union, first = np.unique(pos, return_index=True)
            sal = flags[first]
            marks = None
            if all(inp.sentence is not None for inp in with_flags):
                marks = np.concatenate([np.asarray(inp.sentence, np.uint8) for inp in with_flags])[first]
            sal[union < sinks] = 0.0  # sinks are kept anyway
            u_pos, strength = anchor_strength(metas, strengths, 0)
            aligned = np.zeros(len(union))
            found = np.searchsorted(u_pos, union)
            ok = (found < len(u_pos)) & (u_pos[np.minimum(found, len(u_pos) - 1)] == union)
            aligned[ok] = strength[found[ok]]
            # The facts a document holds do not shrink with the budget: where a quarter of the
            # smallest layer is fewer than a few facts' worth (a number with the words that
            # introduce it and its restatement costs 20-30 tokens), the floor holds them.
            smallest = int(slots.min())
            cap = max(int(sr.share * smallest), min(int(sr.tokens), smallest // 2))
            kept = salient_positions(union, sal, aligned, before=sr.before, after=sr.after,
                                     cap=cap, marks=marks, opening=sr.opening,
                                     sentence=sr.sentence, widen=sr.widen, echo_last=sr.echo_last)
        for i, m in enumerate(metas):
            self._extra_report[m.layer]["salient_tokens"] = int(len(kept))
            scores[i] = boost(scores[i], m.positions, kept)

    def _plan_into(self, source, geometry, target_bytes, put):
        st, ctx = self.stages, self.context
        unit = raw_slot_bytes(geometry)
        mass = isinstance(st.allocator, MassShares)

        # pass 1: per layer, its tokens (LayerMeta), scores and anchor strength; the input
        # (vectors, or the runtime's attention arrays) is dropped as soon as they are taken
        def score(i: int):
            inp = source.load(i)
            raw, sc = self._raw_and_scores(inp, geometry)
            return LayerMeta.of(inp), layer_strength(raw, inp.positions, ctx.sinks), sc

        out = self._each(score, len(source))
        metas = [o[0] for o in out]
        strengths = [o[1] for o in out]
        scores = [o[2] for o in out]
        del out

        # cross-layer decisions, from scores and positions only
        weights = self._weights(metas, geometry)
        slots = self._slot_budget(metas, geometry, target_bytes, weights)
        budgets = slots * unit
        n_min = np.array([min(sink_slots(m.positions, ctx.sinks), m.n) for m in metas], dtype=np.int64)
        self._extra_report = {m.layer: {"share_bytes": int(b)} for m, b in zip(metas, budgets)}
        self._copy_spans(metas, strengths, scores, slots, geometry)
        self._salient(metas, strengths, scores, slots)
        del strengths

        # pass 2a: codebook layers, shallowest first, one layer's vectors at a time
        planned: set[int] = set()
        used = self._codebook_layers(source, geometry, metas, scores, slots, budgets, n_min, planned, put)

        # pass 2b: the bytes left go to the eviction layers
        rest = [i for i in range(len(metas)) if i not in planned]
        if not rest:
            return
        lo = n_min[rest]
        hi = np.array([metas[i].n for i in rest], dtype=np.int64)
        total = (target_bytes - used) // unit
        s_rest = allocate_slots(weights[rest], lo, hi, total)
        if mass:
            alloc = st.allocator
            floor = np.floor(alloc.floor * s_rest).astype(np.int64)
            cap = np.floor(alloc.min_cap * s_rest).astype(np.int64)  # a minimum at the flat share pins it
            floor = np.maximum(floor, np.minimum(cap, alloc.min_slots))
            gains = [layer_gains(scores[i], geometry.g, st.selector.rule, int(n_min[i])) for i in rest]
            s_rest = mass_slots(gains, lo, hi, floor, total)
        planned_slots = dict(zip(rest, (int(s) for s in s_rest)))
        for i, s in planned_slots.items():
            self._extra_report[metas[i].layer]["slots_planned"] = s

        mass_from = len(metas) if st.mass is None else st.mass.first_layer(len(metas))

        def evict(i: int) -> None:
            inp = metas[i] if metas[i].scored else source.load(i)
            store = evict_layer(inp, geometry, scores[i], planned_slots[i], per_query_head=True,
                                union_visible=st.selector.masks == "union", select=st.selector.rule)
            if i >= mass_from:
                weigh_store(store, metas[i].positions, metas[i].available, metas[i].count, ctx.sinks, st.mass.share,
                            st.mass.spread)
            scores[i] = None  # type: ignore[call-overload]  # planned: drop the layer's scores
            put(i, metas[i], store)

        # Smallest store first: each eviction drops its layer's scores, so the largest new
        # store (the runtime allocates it beside the old one) comes when the rest of the
        # plan's arrays are gone. Layers are independent here: the order changes no store.
        pmap(evict, sorted(rest, key=lambda i: planned_slots[i]), ctx.runtime_pass_threads())

    def _codebook_layers(self, source, geometry, metas, scores, slots, budgets, n_min, planned, put) -> int:
        """Plan the codebook layers (adding their indices to ``planned``); returns their bytes."""
        st, ctx, cb = self.stages, self.context, self.stages.codebooks
        if cb is None:
            return 0
        used = 0

        def fit(i: int, inp: LayerInput, cache=None, layout=None) -> None:
            nonlocal used
            f = fit_codebook_layer(inp, geometry, cb, st.selector, scores[i], int(budgets[i]), int(n_min[i]),
                                   cache=cache, layout=layout, threads=ctx.threads)
            if f.store is not None:
                used += layer_store_bytes(f.store, geometry.head_dim_k, geometry.head_dim_v)
                planned.add(i)
                put(i, metas[i], f.store)

        if not cb.auto:
            for i, m in enumerate(metas):
                if m.layer < int(cb.layers) and m.n > slots[i]:
                    fit(i, source.load(i))
            return used
        scale = ctx.attn_scale(geometry.head_dim_k)
        memory = self.role_memory
        for i in range(min(cb.candidates(geometry.n_layer), len(metas))):
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
            lg = layer_logits(inp, geometry, st.scorer, scale)
            dec = decide_role(inp, geometry, st.scorer, st.selector, cb, ctx, lg, int(budgets[i]), int(slots[i]),
                              int(n_min[i]))
            del lg
            self._extra_report[layer].update(err_evict=dec.err_evict, err_codebook=dec.err_codebook)
            if memory is not None:
                memory.put(layer, metas[i].n, dec)
            if dec.codebook:
                fit(i, inp, dec.cache, dec.layout)
            del inp, dec
            if i not in planned and self._extra_report[layer]["err_evict"] is not None:
                break  # eviction wins here: deeper layers are even sparser
        return used


def make_policy(name: str, settings: dict | None = None, context: PlanContext | None = None) -> Policy:
    """The policy called ``name`` (one of :data:`POLICY_NAMES`) with stage ``settings`` applied
    (``{"salient.share": 0.1, "allocator": "pyramid"}``, see :func:`~.presets.apply_settings`)."""
    if name == "full":
        if settings:
            raise ValueError(f"policy full has no stage settings (got {', '.join(settings)})")
        return FullPolicy(context)
    return StagedPolicy(name, apply_settings(preset(name), settings or {}), context)
