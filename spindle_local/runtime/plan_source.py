"""The layers of one compression, as the policy sees them.

A layer that may become a codebook (the first ``codebook_candidates`` layers) is read to
the host: the codebook is built from its rows. Every other layer is *scored* where its
KV lives: the patch computes the window queries' attention over the layer's store and
regular cache, and the value norms, on the layer's backend
(``llama_spindle_layer_scores``), and the policy receives those small arrays with the
positions and a source for every (token, KV head) pair; the store it plans is gathered
by the patch from those sources (``llama_spindle_store_gather``). No K/V row of such a
layer crosses to the host, so a plan costs host memory in proportion to the scores
(``n_head × tokens`` floats per layer), and the same code runs on a CPU, a GPU or an RPC
server.

Sources are numbered as the patch numbers them: ``s < S_old`` is slot ``s`` of the same
KV head in the layer's current store, ``S_old + c`` is cell ``c`` of the regular cache.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from spindle_local.policy import inputs as pin
from spindle_local.policy.plan import LayerStore
from spindle_local.runtime import native
from spindle_local.runtime.heap import release_free_memory

if TYPE_CHECKING:
    from spindle_local.runtime.engine import Engine


def assemble_scored_input(layer: int, sc: native.LayerScores, n_slot_head: np.ndarray, slot_pos: np.ndarray,
                          cut: int, g: int, q_window: np.ndarray, q_positions: np.ndarray,
                          slot_count: np.ndarray | None = None) -> pin.LayerInput:
    """A scored :class:`~spindle_local.policy.inputs.LayerInput` from the patch's per-slot and
    per-cell arrays: rows are the union of the store's positions, then the regular cells
    before ``cut`` in position order; attention is averaged over the window queries that see
    each token (what :func:`~spindle_local.policy.scores.raw_window_scores` computes on
    host vectors). ``slot_count`` [Hkv, S]: the tokens each slot stands for (None: 1)."""
    hkv = len(n_slot_head)
    S = slot_pos.shape[1] if slot_pos.ndim == 2 else 0
    cp = sc.cell_pos
    cells = np.nonzero((cp >= 0) & (cp < cut))[0]
    cells = cells[np.argsort(cp[cells], kind="stable")]
    counts = [int(k) for k in n_slot_head]
    valid = np.arange(S)[None, :] < np.asarray(n_slot_head)[:, None]
    if S:  # the positions some head holds, sorted (positions are small: a mark per position)
        held = slot_pos[valid]
        mark = np.zeros(int(held.max()) + 1 if len(held) else 0, bool)
        mark[held] = True
        union = np.flatnonzero(mark).astype(slot_pos.dtype)
    else:
        union = np.zeros(0, np.int32)
    m = len(union)
    n = m + len(cells)
    positions = np.concatenate([union, cp[cells]]).astype(np.int32)
    attn = np.zeros((hkv * g, n), np.float32)
    v_norm = np.zeros((n, hkv), np.float32)
    avail = np.zeros((n, hkv), bool)
    source = np.zeros((n, hkv), np.int32)
    count = None if slot_count is None else np.ones((n, hkv), np.int32)
    for h, k in enumerate(counts):
        rows = np.searchsorted(union, slot_pos[h, :k])
        attn[h * g:(h + 1) * g, rows] = sc.slot_attn[h * g:(h + 1) * g, :k]
        v_norm[rows, h] = sc.slot_vnorm[h, :k]
        avail[rows, h] = True
        source[rows, h] = np.arange(k, dtype=np.int32)
        if count is not None:
            count[rows, h] = slot_count[h, :k]
    attn[:, m:] = sc.cell_attn[:, cells]
    v_norm[m:] = sc.cell_vnorm[:, cells].T
    avail[m:] = True
    source[m:] = (S + cells)[:, None]
    # the window queries at or after each token (the mean is over those)
    seen = len(q_positions) - np.searchsorted(np.sort(np.asarray(q_positions)), positions, side="left")
    np.divide(attn, np.maximum(seen, 1).astype(np.float32), out=attn)  # correctly rounded, as in f64
    attn[:, seen == 0] = 0.0
    return pin.LayerInput(layer=layer, k=None, k_pre=None, v=None, positions=positions,
                          q_window=q_window, q_positions=np.asarray(q_positions, np.int32),
                          available=avail, attn=attn, v_norm=v_norm, source=source, count=count)


class PlanSource:
    """The policy's :class:`~spindle_local.policy.sources.LayerSource` for one compression.

    Every load reads the runtime afresh: a scored layer is scored again if loaded again
    (the policies load it once: eviction plans it from the first load's
    :class:`~spindle_local.policy.sources.LayerMeta`), a host layer (codebook candidate)
    is read again. Loads are serialised: llama.cpp is used from one thread at a time.
    """

    def __init__(self, engine: Engine, cut: int, lookahead) -> None:
        self.engine, self.cut, self.lookahead = engine, cut, lookahead
        self.lock = threading.Lock()
        # the policy's layer i is the model's layer ids[i] (all layers, or a sliding-window
        # model's global ones)
        self.ids = engine.store_layer_ids
        # only spindle builds codebooks, in its first codebook_candidates layers at most
        self.host_layers = engine.policy.codebook_candidates(len(self.ids))
        self.host_bytes_read = 0  # K/V bytes read to the host by this plan (tests check it)
        self.unscored = set(range(self.host_layers, len(self.ids)))  # scored layers not loaded yet
        # per scored layer until it is installed, for the norms of its new slots: the value
        # norms of its old slots [Hkv, S_old] and of its cells [Hkv, n_cells]
        self.vnorms: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.scoring = True
        self.installs = 0  # layers installed so far

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> pin.LayerInput:
        with self.lock:
            if i < self.host_layers:
                inp = self.engine.host_layer_input(self.ids[i], self.cut, self.lookahead)
                self.host_bytes_read += inp.k.nbytes + inp.v.nbytes
                inp.layer = i
                return inp
            inp = self._score(self.ids[i])
            inp.layer = i
            self.unscored.discard(i)
            if not self.unscored:
                self._end_scoring()
                self._drop_lookahead()
            return inp

    def _end_scoring(self) -> None:
        """Free the score graphs' allocation (the largest of the plan) once every layer is
        scored, before the cross-layer decisions; at the first install at the latest."""
        if self.scoring:
            native.scratch_free(self.engine.ctx)
            self.scoring = False

    def _drop_lookahead(self) -> None:
        """Every scored layer is scored: the probe's query rows of those layers are consumed
        (the list is the plan's own, built by the probe). Host layers keep theirs: a codebook
        candidate is read again when its codebook is fitted."""
        if self.lookahead is not None:
            rows = self.lookahead[1]
            for i in range(self.host_layers, len(self.ids)):
                rows[self.ids[i]] = None

    def _score(self, il: int) -> pin.LayerInput:
        e = self.engine
        q, q_pos = e.window(il, self.lookahead)
        n_slot_head, slot_pos = e._store_meta.get(
            il, (np.zeros(e.pgeo.n_head_kv, np.int32), np.zeros((e.pgeo.n_head_kv, 0), np.int32)))
        known = e._slot_vnorm.get(il)
        if known is not None and known.shape != slot_pos.shape:
            known = None
        sc = native.layer_scores(e.ctx, il, q, q_pos, e.attn_scale(il), slot_pos.shape[1], e.cells,
                                 slot_vnorm=known)
        self.vnorms[il] = (sc.slot_vnorm, sc.cell_vnorm)  # (the engine's own array when known: no copy)
        slot_count = e._slot_count.get(il)
        if slot_count is not None and slot_count.shape != slot_pos.shape:
            slot_count = None
        inp = assemble_scored_input(il, sc, n_slot_head, slot_pos, self.cut, e.pgeo.g, q, q_pos, slot_count)
        if e.policy.wants_salience():
            prio, marks = e._salience()
            inp.salient, inp.sentence = prio[inp.positions], marks[inp.positions]
        return inp

    def install(self, i: int, st: LayerStore) -> None:
        with self.lock:
            self._end_scoring()
            il = self.ids[i]
            norms = self.vnorms.pop(il, None)
            self.installs += 1
            if self.installs == len(self.ids):
                # The last layer's gather allocates its new store beside the old one; the
                # policy installs the largest last, so first hand back the heap pages the
                # other layers' plan arrays left free (2-3 MiB of peak RSS at 8,000 tokens).
                release_free_memory()
            self.engine.install_store(il, st, None if norms is None else np.concatenate(norms, axis=1))
