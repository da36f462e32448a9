"""Build one layer's :class:`LayerStore`: raw eviction layers and codebook layers.

A codebook layer gets a byte budget, not a slot count: how many tokens fit depends on
how many entries their codebooks need, which is known only after building them. Rather
than build-measure-shrink in a loop, the codebooks are built once on the largest set
that could possibly fit (tokens in selection-priority order), then trimmed: the number of
distinct entries used by every prefix of that order is counted in one pass, which gives
the exact byte cost of keeping the best ``S`` tokens for every ``S``; the largest ``S``
within the budget wins. Dropping slots keeps every remaining slot's entry, so the cosine
guarantee holds for the trimmed codebook. K and V each use a codebook or stay raw,
whichever combination keeps the most tokens; a layer where no codebook beats plain
eviction stays an eviction layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .budgets import codebook_layer_bytes, raw_slot_bytes
from .inputs import Geometry, LayerInput
from .stages import Codebooks, GroupSelect
from .parallel import pmap
from .plan import F16_BYTES, INDEX_BYTES, MAG_BYTES, MASK_BYTES, POS_BYTES, Codebook, HeadStore, LayerStore
from .select import group_priority, group_select, union_priority, union_select


def protect(
    scores: np.ndarray, positions: np.ndarray, sinks: int, available: np.ndarray | None = None
) -> np.ndarray:
    """Scores [H, n] with the sinks (position < ``sinks``) at +inf so no tie can evict them,
    and pairs absent from a KV head (``available`` [n, Hkv] False) at -inf."""
    s = np.array(scores, dtype=np.float32, copy=True)
    s[:, np.asarray(positions) < sinks] = np.inf
    if available is not None:
        g = s.shape[0] // available.shape[1]
        for hq in range(s.shape[0]):
            s[hq, ~available[:, hq // g]] = -np.inf
    return s


def available_counts(inp: LayerInput, n_kv: int) -> np.ndarray:
    """Tokens each KV head can keep (all ``n`` unless ``inp.available`` says otherwise)."""
    avail = inp.available_mask()
    if avail is None:
        return np.full(n_kv, inp.n, dtype=np.int64)
    return avail.sum(axis=0).astype(np.int64)


def head_store(
    inp: LayerInput,
    h: int,
    sel: np.ndarray,
    mask: np.ndarray,
    k_cb: Codebook | None = None,
    v_cb: Codebook | None = None,
) -> HeadStore:
    """A HeadStore for tokens ``sel`` of KV head ``h``, slots sorted by position.

    ``mask`` [g, len(sel)] and the codebooks' slot arrays are given in ``sel`` order.
    """
    pos = np.asarray(inp.positions)[sel]
    perm = np.argsort(pos, kind="stable")
    sel = np.asarray(sel, dtype=np.int64)[perm]
    mask = np.asarray(mask, dtype=bool)[:, perm]
    hs = HeadStore(
        positions=pos[perm].astype(np.int32),
        qmask=np.ascontiguousarray(mask),
        token_index=sel,
    )
    if inp.k is None:  # a scored input: the runtime gathers the rows where they live
        if k_cb is not None or v_cb is not None:
            raise ValueError(f"layer {inp.layer}: a codebook needs the layer's vectors")
        hs.source = np.asarray(inp.source)[sel, h].astype(np.int32)
        return hs
    from .codebook import subset_codebook  # numba loads with the first codebook layer (see .jit)

    if k_cb is None:
        hs.k_raw = np.ascontiguousarray(inp.k[sel, h, :], dtype=np.float32)
    else:
        hs.k_codebook = subset_codebook(k_cb, perm)
    if v_cb is None:
        hs.v_raw = np.ascontiguousarray(inp.v[sel, h, :], dtype=np.float32)
    else:
        hs.v_codebook = subset_codebook(v_cb, perm)
    return hs


def select_tokens(grp: np.ndarray, n_slots: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and query-head masks for one GQA group: ``'union'`` (SpindleKV round-robin,
    each query head masked to its own top-k), ``'mean'`` (SnapKV) or ``'max'`` (group max,
    every head sees every slot)."""
    if mode == "union":
        return union_select(grp, n_slots)
    return group_select(grp, n_slots, mode)


def selection_priority(grp: np.ndarray, mode: str) -> np.ndarray:
    """Every token of a group in the order ``select_tokens(grp, S, mode)`` takes them."""
    return union_priority(grp) if mode == "union" else group_priority(grp, mode)


def layer_gains(scores: np.ndarray, g: int, mode: str, n_protected: int) -> np.ndarray:
    """Window attention mass the layer's ``t``-th unprotected slot would keep, summed over heads.

    Per KV head, tokens in selection order (``mode``); a token's mass is the sum of its
    (protected) scores over the group's query heads, non-finite ones (sinks, absent
    pairs) counting 0. Every KV head keeps the same slot count, so the layer's gain of
    its ``t``-th slot is the sum over KV heads. Returns float64 [n - n_protected].
    """
    n_h, n = scores.shape
    m = max(n - n_protected, 0)
    out = np.zeros(m, dtype=np.float64)
    finite = np.where(np.isfinite(scores), scores, 0.0).astype(np.float64)
    for h in range(n_h // g):
        grp = scores[h * g : (h + 1) * g]
        prio = selection_priority(grp, mode)[n_protected:]
        out[: len(prio)] += finite[h * g : (h + 1) * g][:, prio].sum(axis=0)[:m]
    return out


def evict_layer(
    inp: LayerInput,
    geometry: Geometry,
    scores: np.ndarray,
    n_slots: int,
    per_query_head: bool,
    role: str = "evict",
    union_visible: bool = False,
    select: str | None = None,
) -> LayerStore:
    """Raw layer keeping ``n_slots`` tokens per KV head (protected scores [H, n] given).

    ``select`` picks the group rule (:func:`select_tokens`); None means ``'union'``
    (per-query-head round-robin) when ``per_query_head`` else ``'mean'``.
    """
    g = geometry.g
    store = LayerStore(layer=inp.layer, role=role)
    cap = available_counts(inp, geometry.n_head_kv)
    mode = select or ("union" if per_query_head else "mean")
    for h in range(geometry.n_head_kv):
        grp = scores[h * g : (h + 1) * g]
        s_h = int(min(n_slots, cap[h]))  # absent pairs rank last (-inf): never reached
        sel, mask = select_tokens(grp, s_h, mode)
        if union_visible:
            mask = np.ones_like(mask)
        store.heads.append(head_store(inp, h, sel, mask))
    return store


@dataclass
class CodebookFit:
    """Result of fitting a codebook layer into a byte budget."""

    store: LayerStore | None  # None: no codebook layout beats raw eviction
    n_slots: int
    n_slots_raw: int
    bytes: int
    k_codebook: bool
    v_codebook: bool
    options: dict = field(default_factory=dict)  # (k_codebook, v_codebook) -> slots that fit


def fit_codebook_layer(
    inp: LayerInput,
    geometry: Geometry,
    codebooks: Codebooks,
    selector: GroupSelect,
    scores: np.ndarray,
    budget_bytes: int,
    n_min: int,
    cache: dict | None = None,
    layout: tuple[bool, bool] | None = None,
    threads: int | None = None,
) -> CodebookFit:
    """Evict (per-query-head union order) and codebook K (pre-RoPE) and V within ``budget_bytes``.

    When every token could fit, the codebooks are built on all tokens in their natural
    order, which does not depend on the scores: ``cache`` (a dict owned by the caller,
    one per layer) then lets a second fit with other scores reuse them.
    ``layout`` forces (K codebook?, V codebook?); by default the layout keeping the most
    tokens wins. ``options`` of the result lists the slots every layout would keep.
    """
    from .codebook import build_codebook, distinct_prefix_counts, subset_codebook  # numba: see .jit

    n = inp.n
    g, hkv = geometry.g, geometry.n_head_kv
    dk, dv = geometry.head_dim_k, geometry.head_dim_v
    raw_slots = min(n, budget_bytes // raw_slot_bytes(geometry))
    use_k = inp.k_pre is not None
    # Largest S that could fit if each codebook had one entry per head: build on that many.
    k_min = hkv if use_k else None
    per_slot = codebook_layer_bytes(geometry, 2, k_min, hkv) - codebook_layer_bytes(geometry, 1, k_min, hkv)
    fixed = codebook_layer_bytes(geometry, 1, k_min, hkv) - per_slot
    s_hi = int(min(n, max(0, (budget_bytes - fixed) // per_slot)))
    s_hi = int(min(s_hi, available_counts(inp, hkv).min()))  # one S for all heads
    if s_hi <= raw_slots:
        return CodebookFit(None, raw_slots, raw_slots, 0, False, False)
    mode = selector.rule
    prio = [selection_priority(scores[h * g : (h + 1) * g], mode)[:s_hi] for h in range(hkv)]
    all_tokens = s_hi == n
    # build_rows[h]: the rows each codebook is built on; order[h]: priority order as
    # positions within build_rows (its prefixes are the candidate slot sets)
    build_rows = [np.arange(n) if all_tokens else prio[h] for h in range(hkv)]
    order = [prio[h] if all_tokens else np.arange(s_hi) for h in range(hkv)]
    jobs = [(h, "v") for h in range(hkv)] + ([(h, "k") for h in range(hkv)] if use_k else [])
    cache = {} if cache is None else cache
    keys = {
        (h, which): (h, which, None if all_tokens else hash(prio[h].tobytes())) for h, which in jobs
    }
    todo = [j for j in jobs if keys[j] not in cache]

    def build(job: tuple[int, str]) -> Codebook:
        h, which = job
        rows = build_rows[h]
        if which == "v":
            return build_codebook(inp.v[rows, h, :], codebooks.theta_v)
        return build_codebook(inp.k_pre[rows, h, :], codebooks.theta_k)

    cache.update(zip([keys[j] for j in todo], pmap(build, todo, threads)))
    vcbs = [cache[keys[(h, "v")]] for h in range(hkv)]
    kcbs = [cache[keys[(h, "k")]] for h in range(hkv)] if use_k else []
    k_counts = np.zeros(s_hi + 1, dtype=np.int64)
    v_counts = np.zeros(s_hi + 1, dtype=np.int64)
    for h in range(hkv):
        v_counts += distinct_prefix_counts(vcbs[h].index, order[h])
        if use_k:
            k_counts += distinct_prefix_counts(kcbs[h].index, order[h])
    s_arr = np.arange(s_hi + 1, dtype=np.int64)
    overhead = hkv * s_arr * (POS_BYTES + g * MASK_BYTES)  # as in plan.layer_store_bytes
    best = (raw_slots, False, False)
    combos = [(True, True), (False, True)] + ([(True, False)] if use_k else [])
    if not use_k:
        combos = [(False, True)]
    options = {}
    for kc, vc in combos:
        total = overhead.copy()
        slot_cb = hkv * s_arr * (INDEX_BYTES + MAG_BYTES)
        total += (k_counts * dk * F16_BYTES + slot_cb) if kc else hkv * s_arr * dk * F16_BYTES
        total += (v_counts * dv * F16_BYTES + slot_cb) if vc else hkv * s_arr * dv * F16_BYTES
        fits = np.nonzero(total <= budget_bytes)[0]
        s = int(fits.max()) if len(fits) else 0
        options[(kc, vc)] = s
        if (layout is None and s > best[0]) or (layout == (kc, vc) and s > raw_slots):
            best = (s, kc, vc)
    s, kc, vc = best
    if not (kc or vc) or s < n_min:
        return CodebookFit(None, raw_slots, raw_slots, 0, False, False, options)
    store = LayerStore(layer=inp.layer, role="evict+codebook" if s < n else "codebook")
    for h in range(hkv):
        rows = prio[h][:s]
        grp = scores[h * g : (h + 1) * g]
        sel, mask = select_tokens(grp, s, mode)
        # the selected set equals the priority prefix; align the mask to ``rows`` order
        where = np.full(n, -1, dtype=np.int64)
        where[sel] = np.arange(len(sel))
        assert (where[rows] >= 0).all(), "priority prefix and union selection disagree"
        m_rows = mask[:, where[rows]]
        if selector.masks == "union":
            m_rows = np.ones_like(m_rows)
        k_cb = subset_codebook(kcbs[h], order[h][:s]) if kc else None
        v_cb = subset_codebook(vcbs[h], order[h][:s]) if vc else None
        store.heads.append(head_store(inp, h, rows, m_rows, k_cb, v_cb))
    nbytes = codebook_layer_bytes(
        geometry,
        s,
        sum(hs.k_codebook.n_entries for hs in store.heads) if kc else None,
        sum(hs.v_codebook.n_entries for hs in store.heads) if vc else None,
    )
    return CodebookFit(store, s, raw_slots, nbytes, kc, vc, options)
