"""The engine: prefill in chunks, compress the KV cache, decode.

One sequence on one patched llama.cpp context. The regular cache holds the recent
tokens; older tokens live in the compressed store that the patch adds to every layer.
When to compress (DESIGN.md section 2, "When to compress"):

* while a prompt is read, before a chunk that no longer fits in the regular cache
  (``eager_compress`` compresses after every chunk instead). Compressing as late as
  the allocation allows keeps the observation window near the end of the prompt, where
  a question usually is. For the same reason a mid-prompt plan also scores with
  *look-ahead* queries (the prompt's last ``window`` tokens, probed from where the
  reading is; :meth:`Engine._probe`) and keeps as much as the end-of-prompt plan will;
* when a prompt has been read, so that the reserve ratio is within budget whenever
  ``feed`` returns;
* during generation, whenever the recent part outgrows ``recent + decode_slack``.

Each compression re-plans the whole store: tokens already in it are scored again with
the newest window queries, where the KV lives (:mod:`.plan_source`), and planned together
with the tokens moving in; the patch gathers each layer's new store on its backend.
The plan's byte target is ``kv_budget × full-cache bytes`` minus the recent part,
minus headroom for the tokens that will arrive before the next compression, so the
reserve ratio (store + recent bytes) / (full f16 cache bytes) stays within the budget
from the end of a prompt on, through generation. While one prompt is read, KV memory
is bounded by the regular-cache allocation (``n_cells``) plus a store no larger than
the one kept when the prompt has been read.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from spindle_local.errors import SpindleError, UsageError
from spindle_local.policy import inputs as pin
from spindle_local.policy.plan import LayerStore, full_cache_bytes
from spindle_local.policy.parallel import planning_threads
from spindle_local.policy.policies import make_policy
from spindle_local.policy.stages import PlanContext
from spindle_local.policy.roles import RoleMemory
from spindle_local.policy import rope as roper
from spindle_local.runtime import native
from spindle_local.runtime.gguf_meta import read_rope_factors
from spindle_local.runtime.heap import release_free_memory
from spindle_local.runtime.devices import offload_device_present
from spindle_local.runtime.config import MIN_SLACK, POLICIES, EngineConfig  # noqa: F401
from spindle_local.runtime.interrupt import CancelFlag, Interrupted, sigint_sets  # noqa: F401  (re-exported)
from spindle_local.runtime.lowlevel import LlamaContext, LlamaModel
from spindle_local.runtime.memory import (
    CACHE_VALUE_BYTES,
    STORE_UBATCH,
    MemoryLayout,
    WindowCache,
    format_size,
    plan_model_memory,
)
from spindle_local.runtime.schedule import Schedule, compress_due, needs_compress
from spindle_local.runtime.plan_source import PlanSource
from spindle_local.runtime.window import WindowQueries

@dataclass
class EngineStats:
    tokens_seen: int = 0
    tokens_prefilled: int = 0
    tokens_generated: int = 0
    compressions: int = 0
    compress_seconds: float = 0.0  # plans and their look-ahead probes
    probe_seconds: float = 0.0  # the look-ahead probes alone (part of compress_seconds)
    probes: int = 0  # look-ahead probes run
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    store_bytes: int = 0
    regular_bytes: int = 0
    full_bytes: int = 0
    over_budget_compressions: int = 0
    peak_reserve_ratio: float = 0.0  # highest ratio seen mid-prompt, after the first compression
    extra: dict = field(default_factory=dict)

    @property
    def kv_bytes(self) -> int:
        return self.store_bytes + self.regular_bytes

    @property
    def reserve_ratio(self) -> float:
        return self.kv_bytes / self.full_bytes if self.full_bytes else 1.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["kv_bytes"] = self.kv_bytes
        d["reserve_ratio"] = self.reserve_ratio
        return d


@dataclass
class _Salience:
    """The salience classification of ``tokens`` (:meth:`Engine._salience`), extended as they grow."""

    tokens: list[int]
    flags: np.ndarray  # bool: salient tokens
    marks: np.ndarray  # uint8: sentence marks
    ended: bool  # the text ends a sentence
    priority: np.ndarray  # float: run priority


@dataclass
class _Checkpoint:
    """What :meth:`Engine.transaction` returns to; ``snapshot`` only once something irreversible happened."""

    tokens: list[int]
    next_pos: int
    allowance: int | None
    stats: EngineStats
    queries: tuple[np.ndarray, list[np.ndarray | None]]
    logits: np.ndarray | None
    window: np.ndarray | None = None  # a sliding-window model's window ring (engine_state.window_state)
    snapshot: tuple[dict[str, Any], dict[str, np.ndarray]] | None = None


class Engine:
    """A model, one context, one conversation's tokens, and the compression schedule."""

    def __init__(self, model_path: str | Path, config: EngineConfig | None = None,
                 *, model: LlamaModel | None = None) -> None:
        self.config = config or EngineConfig()
        self.config.validate()
        self._owns_model = model is None  # close() frees only what this engine created
        cfg = self.config
        self.layout: MemoryLayout | None = None  # set when a KV memory cap (kv_mem) sizes everything
        cells, self.chunk = self._allocation(model_path)  # refuses what cannot run before loading
        self.model = model or self.config.load_model(model_path)
        native.native()  # the runtime is patched (one-line error otherwise) before a context exists
        # Prompt chunks with a store attend over slots + cells through a per-query-head mask
        # of (slots + cells) x ubatch x heads: a smaller ubatch bounds that transient.
        self.ubatch = self.chunk if cfg.policy == "full" else min(self.chunk, STORE_UBATCH)
        self.ctx = LlamaContext(self.model, n_ctx=cells, n_batch=self.chunk, n_ubatch=self.ubatch,
                                n_threads=cfg.n_threads, flash_attn=cfg.flash_attn,
                                type_k=cfg.cache_type, type_v=cfg.cache_type)
        self.geometry = self.ctx.geometry()
        g = self.geometry
        # The layers the store serves: every layer of a plain KV cache; with llama.cpp's
        # interleaved sliding-window cache, the global layers (the window layers keep a
        # bounded cache that llama.cpp manages). Plans see these layers as 0..len-1.
        self.store_layer_ids = [il for il, lg in enumerate(g.layers) if lg.has_kv]
        self._windowed = bool(g.swa_layers())
        if self._windowed and (not self.store_layer_ids or
                               any(not lg.has_kv for lg in g.layers if not lg.is_swa)):
            raise SpindleError("internal: the runtime does not expose the global layers' cache of this "
                               "sliding-window model")
        self.queries = WindowQueries(g.n_layer, cfg.window, g.layers[0].n_head, g.layers[0].head_dim_k,
                                     layers=self.store_layer_ids)
        self._capturing = False  # whether the patch copies window queries during decodes
        try:  # the policy's geometry: the layers the store serves
            self.pgeo = g.attention(n_layer=len(self.store_layer_ids))
        except ValueError:
            raise SpindleError("models whose layers differ in attention shape are not supported yet") from None
        pg = self.pgeo
        # bytes per token of the layers the store serves, and the window layers' cache: held
        # alike by every policy (and by a full cache), it counts on both sides of the ratio
        self.bytes_per_token = full_cache_bytes(1, pg.n_layer, pg.n_head_kv, pg.head_dim_k, pg.head_dim_v)
        self.fixed_bytes = self._window_cache_bytes("f16")
        self.window_cache_bytes = self._window_cache_bytes(cfg.cache_type)  # what llama.cpp allocated
        # what one regular-cache token holds in the cache's own type (q8_0 / q4_0: fewer bytes)
        self.regular_token_bytes = round(self.bytes_per_token * CACHE_VALUE_BYTES[cfg.cache_type] / 2.0)
        self.rope_ok = roper.rope_supported(g.rope_type, g.ext_factor)
        # per-frequency factors the graph's RoPE divides by (Llama 3.1 style); host RoPE too
        self.rope_factors = read_rope_factors(model_path) if self.meta.rope_factors else None
        self.max_tokens = cfg.max_tokens or g.n_ctx_train or 1 << 30
        self.policy = make_policy(cfg.policy, cfg.stages, PlanContext(sinks=cfg.sinks))
        # layers on a GPU or an RPC server (any of them) compute off this CPU's threads
        offloaded = bool(cfg.rpc) or (cfg.gpu_layers != 0 and offload_device_present())
        self.policy.context.beside_runtime = planning_threads(self.ctx.n_threads, native_on_cpu=not offloaded)
        self.policy.role_memory = RoleMemory()
        self.graph_attn_scale: float | None = None  # the model graph's softmax scale, once a graph reported it
        self.cells = self.ctx.n_ctx
        if self.layout is not None:
            alloc = self._regular_alloc_bytes()
            if alloc + self.layout.store_cap > self.layout.kv_mem:
                raise SpindleError(f"internal: llama.cpp allocated {alloc} bytes for {self.cells} cells (window "
                                   f"layers included), more than --kv-mem {format_size(self.layout.kv_mem)} "
                                   "leaves for the regular cache")
        self.tokens: list[int] = []
        self.stats = EngineStats()
        self._store_layers: set[int] = set()
        # what each layer's store holds, as installed: (slots per KV head [Hkv], positions [Hkv, S])
        self._store_meta: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # the value norms of a gathered store's slots [Hkv, S], carried from the plan that
        # gathered it (a store's V rows do not change until it is replaced): the next plan's
        # scores then read none of the store's V rows. Absent for an uploaded store.
        self._slot_vnorm: dict[int, np.ndarray] = {}
        # layers whose slots stand for more than one token each (policy/mass.py): uint8 [Hkv, S]
        self._slot_count: dict[int, np.ndarray] = {}
        self._allowance: int | None = None  # regular tokens the last plan left room for (None: no plan)
        self._prompt_end: int | None = None  # while feed() reads a prompt: the position after it
        # while feed() reads a prompt: (tokens read when made, its queries), for lookahead_reuse
        self._last_probe: tuple[int, tuple[np.ndarray, list[np.ndarray]]] | None = None
        # Interrupts (runtime/interrupt.py): SIGINT or another thread sets ``cancel``; feed,
        # step and generate look at it only between native calls and raise Interrupted.
        self.cancel = CancelFlag()
        self._checkpoint: _Checkpoint | None = None  # inside transaction(): the state to return to
        # salient-token classification of the tokens so far, and token pieces by id (_salience)
        self._salient_memo: _Salience | None = None
        self._pieces: dict[int, str] = {}
        self.finish_reason: str | None = None  # why the last generate() ended: stop, length, context

    def _allocation(self, model_path: str | Path) -> tuple[int, int]:
        """(regular-cache cells, prompt chunk) for this configuration; sets ``self.layout`` under kv_mem."""
        from spindle_local.runtime.gguf_meta import read_meta
        from spindle_local.runtime.support import model_support

        cfg = self.config
        meta = self.meta = read_meta(model_path)
        support = model_support(meta)  # read_meta has refused what cannot run at all
        if support.kind == "full" and cfg.policy != "full":
            raise UsageError(support.full_only())
        if cfg.kv_mem is None and cfg.policy == "full":
            return cfg.n_cells or cfg.max_tokens or 4096, cfg.chunk
        if cfg.kv_mem is None:
            # The same cells whatever the budget (config.cells); a budget that no plan can
            # meet within the longest context is refused before the context is created.
            longest = cfg.max_tokens or meta.n_ctx_train or 1 << 30
            cfg.check_budget(longest=longest, geometry=meta.attention, model_name=meta.name or Path(model_path).name)
            return cfg.cells(longest), cfg.chunk
        longest = cfg.max_tokens or meta.n_ctx_train or 4096
        self.layout = plan_model_memory(meta, cfg.kv_mem, policy=cfg.policy, window=cfg.window, recent=cfg.recent,
                                        chunk=cfg.chunk, max_tokens=longest,
                                        model_name=meta.name or Path(model_path).name)
        return self.layout.cells, self.layout.chunk

    def kv_memory(self) -> tuple[int, int]:
        """(bytes llama.cpp holds for KV now: regular allocation + store buffers, the cap or 0)."""
        parts = self.memory_parts()
        return parts["regular_cache_bytes"] + parts["store_bytes"], (self.layout.kv_mem if self.layout else 0)

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(info, arrays)``: everything needed to continue this conversation (:mod:`.engine_state`)."""
        from spindle_local.runtime import engine_state

        return engine_state.state_dict(self)

    def load_state_dict(self, info: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Take the state :meth:`state_dict` returned (same model and settings; reset first)."""
        from spindle_local.runtime import engine_state

        engine_state.load_state_dict(self, info, arrays)

    def memory_parts(self) -> dict[str, int]:
        """Bytes of each part of what the conversation holds: llama.cpp's regular cache
        allocation, the store's buffers, and what compression keeps on the host between
        plans (the window queries, the store's slot positions and value norms)."""
        host = (self.queries.nbytes() + sum(a.nbytes + b.nbytes for a, b in self._store_meta.values())
                + sum(a.nbytes for a in self._slot_vnorm.values())
                + sum(a.nbytes for a in self._slot_count.values()))
        return {
            "regular_cache_bytes": self._regular_alloc_bytes(),  # the window layers' cache included
            "window_cache_bytes": self.window_cache_bytes,
            "store_bytes": int(native.store_buffer_bytes(self.ctx)) if self._store_layers else 0,
            "host_copies_bytes": int(host),
        }

    # -- state ---------------------------------------------------------------------------

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def regular_count(self) -> int:
        """Tokens in the regular cache of the layers the store serves."""
        return self.ctx.kv_used()

    def _regular_alloc_bytes(self) -> int:
        """Bytes llama.cpp allocated for the regular cache (a sliding-window model's window
        layers included)."""
        return int(self.ctx.cache_bytes()[1]) + self.window_cache_bytes

    def _window_cache_bytes(self, cache_type: str) -> int:
        """Bytes of the window layers' ring of a sliding-window model (0 otherwise): ``n_swa +
        ubatch`` cells, padded, at most the context's, in ``cache_type``. At f16 it is what the
        schedule counts on both sides of the reserve ratio (a full cache holds it too)."""
        g = self.geometry
        layers = [lg for lg in g.layers if not lg.has_kv]
        if not self._windowed or not layers:
            return 0
        cache = WindowCache(n_swa=g.n_swa, ubatch=self.ubatch,
                            bytes_per_cell=int(sum(lg.n_head_kv * (lg.head_dim_k + lg.head_dim_v)
                                                   for lg in layers) * CACHE_VALUE_BYTES[cache_type]))
        return cache.nbytes(self.ctx.n_ctx)

    def refresh_stats(self) -> EngineStats:
        s = self.stats
        s.tokens_seen = self.n_past
        s.store_bytes = self.ctx.store_bytes() if self._store_layers else 0
        s.regular_bytes = self.regular_count() * self.regular_token_bytes + self.window_cache_bytes
        s.full_bytes = self.n_past * self.bytes_per_token + self.fixed_bytes
        return s

    def reset(self) -> None:
        """Forget everything: regular cache, store, tokens and counters."""
        self._before_irreversible()
        self.ctx.clear()
        if self._store_layers:
            self.ctx.store_clear()
            self._store_layers.clear()
        self._store_meta.clear()
        self._slot_vnorm.clear()
        self._slot_count.clear()
        self.policy.role_memory.clear()
        self.queries.reset()
        self.tokens = []
        self.stats = EngineStats()
        self._allowance = None

    def truncate(self, n: int) -> bool:
        """Forget every token from index ``n`` on, if they are all still in the regular cache.

        Returns False (and changes nothing) when some of them were compressed: the exact
        state before them no longer exists, so the caller must reset and re-read.
        """
        if n >= self.n_past:
            return True
        if not self._holds_context_of(n):
            return False
        self._before_irreversible()
        self.ctx.seq_rm(n, -1)
        del self.tokens[n:]
        self.ctx.next_pos = n
        self.queries.truncate(n)
        return True

    def _holds_context_of(self, n: int) -> bool:
        """Do the caches still hold exactly what a token at position ``n`` attends to?

        Every token from ``n`` on must be in the regular cache (none compressed: it holds
        positions ``n_past - kv_used`` on), and a sliding-window model's window ring must
        still hold the tokens before ``n`` that its window shows the token at ``n``
        (positions ``n - n_swa + 1`` on; a chunked window starts no earlier): the ring
        reuses the cells of tokens its window has passed, oldest first, and llama.cpp
        reports the ring's first position for such a model.
        """
        if n < self.n_past - self.ctx.kv_used():
            return False
        if self._windowed and n > 0:
            ring_min, _ = self.ctx.pos_range()
            if ring_min > max(0, n - self.geometry.n_swa + 1):
                return False
        return True

    def close(self) -> None:
        """Free the context, and the model when this engine loaded it (a model passed in stays open)."""
        self.ctx.close()
        if self._owns_model:
            self.model.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- feeding ---------------------------------------------------------------------------

    def context_limit(self) -> tuple[int, str]:
        """The most tokens this conversation may hold, and what sets that limit (named in messages).

        ``max_tokens`` is ``--ctx`` when given, else the model's trained context; a full
        cache (``--policy full``) also cannot hold more than its cells.
        """
        if self.config.max_tokens:
            limit, name = self.max_tokens, f"--ctx {self.max_tokens}"
        else:
            limit, name = self.max_tokens, f"the model's trained context of {self.max_tokens:,} tokens"
        if self.config.policy == "full" and self.cells < limit:
            via = f"--kv-mem {format_size(self.layout.kv_mem)}" if self.layout else "--ctx"
            limit, name = self.cells, f"the full cache's {self.cells} cells ({via})"
        return limit, name

    def _check_room(self, n_new: int) -> None:
        limit, name = self.context_limit()
        if self.n_past + n_new > limit:
            raise UsageError(f"the context would reach {self.n_past + n_new} tokens, beyond {name}")

    def _decode(self, tokens: Sequence[int], *, capture: bool, all_logits: bool = False) -> None:
        start = self.n_past
        pos = np.arange(start, start + len(tokens), dtype=np.int32)
        self._capture(capture)
        if capture and not all_logits and len(tokens) > self.ubatch:
            # one decode per ubatch, so that each one's captured rows are read before the next
            # overwrites them (the window may span two ubatches)
            for a in range(0, len(tokens), self.ubatch):
                self.ctx.decode(tokens[a:a + self.ubatch], pos[a:a + self.ubatch], logits="last")
                self.queries.collect(self.ctx, pos[a:a + self.ubatch])
        else:
            self.ctx.decode(tokens, pos, logits="all" if all_logits else "last")
            if capture:
                self.queries.collect(self.ctx, pos)
        self.tokens.extend(int(t) for t in tokens)

    def _capture(self, on: bool) -> None:
        """Arm or stop the patch's window-query capture (a change rebuilds the decode graph
        once, so the state is kept across decodes that want the same)."""
        if on == self._capturing:
            return
        native.capture(self.ctx, self.config.window if on else 0)
        self._capturing = on

    def feed(self, tokens: Sequence[int], *, progress=None, all_logits: bool = False) -> np.ndarray:
        """Prefill ``tokens`` after what the engine holds; return the next-token logits.

        With ``all_logits`` the result is ``[len(tokens), vocab]``: the logits after every
        token (for scoring a continuation). ``progress(done, total, stats)`` is called after
        every chunk when given.

        A cancel (:attr:`cancel`, set by Ctrl-C) is answered before the next chunk: the
        engine then holds what it held plus the chunks fully read, and :class:`Interrupted`
        is raised (:meth:`transaction` takes it back to the state before the call).
        """
        tokens = list(tokens)
        if not tokens:
            raise UsageError("nothing to feed: empty prompt")
        self._check_room(len(tokens))
        self._prompt_end = self.n_past + len(tokens)
        try:
            with self._guarded():
                return self._feed_chunks(tokens, progress, all_logits)
        finally:
            self._prompt_end = None
            self._last_probe = None  # a probe serves the plans of its own prompt only

    def _feed_chunks(self, tokens: list[int], progress, all_logits: bool) -> np.ndarray:
        rows: list[np.ndarray] = []
        end = self._prompt_end  # position after the prompt
        chunk = self.chunk
        compressing = self.config.policy != "full"
        done = 0
        w = self.config.window
        while done < len(tokens):
            self.cancel.check()  # between chunks only: never a half-read batch
            take = min(chunk, len(tokens) - done)
            reserve = 0  # cells kept free for the look-ahead probe at the next plan
            if compressing:
                # Compress *before* a chunk that does not fit in the regular cache any more.
                # Compressing as late as the allocation allows keeps the observation window
                # as close as possible to the end of the prompt (where the question is):
                # what an early plan evicts never comes back, so mid-prompt plans also look
                # ahead (:meth:`_probe`) and keep as much as the end-of-prompt plan will
                # (:meth:`_target_bytes`). While a prompt is read, memory is bounded by the
                # regular-cache allocation plus that store; the reserve ratio is within
                # budget whenever feed() returns and during generation.
                # The rest of the prompt fits in the cells left: no plan, so no probe room either
                # (a conversation that fits in the allocation is never compressed).
                fits = self.cells - self.regular_count() >= len(tokens) - done
                probe = self._lookahead_ok(len(tokens) - done) and not fits
                reserve = w if probe else 0
                room = self.cells - self.regular_count() - reserve
                eager = self.config.eager_compress and self._needs_compress(take)
                if self.config.fill_cells and w <= room < take and not eager:
                    # Fill the cells left before planning: a plan every ``cells - recent - window``
                    # tokens instead of every chunk (see ``EngineConfig.fill_cells``).
                    take = room
                elif room < take or eager:
                    self._before_irreversible()  # a transaction must be able to undo what follows
                    ahead = self._timed_probe(tokens[-w:], end - w) if probe and room >= 0 else None
                    # Lazy: keep in the regular cache whatever the rest of the prompt leaves room
                    # for; the cells are allocated anyway, and the tokens still to read (the
                    # question among them) then see the old ones exactly, not a store. Not with
                    # eager_compress, whose point is staying within budget while reading.
                    lazy = self.config.lazy_plans and not eager
                    keep = self.cells - reserve - (len(tokens) - done) if lazy else 0
                    self.maybe_compress(growth=0, force=room < take, lookahead=ahead, keep=keep)
            take = max(1, min(take, self.cells - self.regular_count() - reserve))
            part = tokens[done:done + take]
            t0 = time.perf_counter()
            self._decode(part, capture=compressing, all_logits=all_logits)
            self.stats.prefill_seconds += time.perf_counter() - t0
            self.stats.tokens_prefilled += len(part)
            if all_logits:
                rows.append(self.ctx.logits())
            done += take
            if compressing:
                s = self.refresh_stats()
                s.peak_reserve_ratio = max(s.peak_reserve_ratio, s.reserve_ratio if s.compressions else 0.0)
            if progress is not None:
                progress(done, len(tokens), self.refresh_stats())
        if compressing and self._needs_compress(0):
            # Leave room for generation: within budget for ``_slack()`` more tokens.
            self.maybe_compress(growth=self._slack())
        return np.concatenate(rows) if all_logits else self.ctx.logits()

    def step(self, token: int) -> np.ndarray:
        """Decode one generated token and return the logits that follow it.

        Raises :class:`Interrupted` before decoding when a cancel is pending (the token
        is then not part of the conversation).
        """
        self.cancel.check()
        self._check_room(1)
        with self._guarded():
            return self._step(token)

    def _step(self, token: int) -> np.ndarray:
        cfg = self.config
        capture = False
        if cfg.policy != "full":
            if self._compress_due(1):
                self.maybe_compress(growth=self._slack(), force=self.regular_count() + 1 > self.cells)
            # Capture queries only for the tokens that will form the next compression's window.
            capture = self._compress_due(1 + cfg.window)
        t0 = time.perf_counter()
        self._decode([token], capture=capture)
        self.stats.decode_seconds += time.perf_counter() - t0
        self.stats.tokens_generated += 1
        return self.ctx.logits()

    # -- interrupts ----------------------------------------------------------------------------

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A region (a chat turn) in which Ctrl-C only sets :attr:`cancel`.

        The engine answers the request at its next clean point with :class:`Interrupted`;
        nothing is ever raised inside llama.cpp's callbacks. A request still pending when
        the region ends came after the work was done and is dropped.
        """
        self.cancel.clear()
        try:
            with sigint_sets(self.cancel):
                yield
        finally:
            self.cancel.clear()

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        """Route SIGINT to :attr:`cancel` for one call when no :meth:`interruptible` region does.

        A Ctrl-C during the call's native work is answered when the call returns, after
        the work it finished, as a ``KeyboardInterrupt`` would have been.
        """
        with sigint_sets(self.cancel) as mine:
            yield
        if mine:
            self.cancel.check()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All or nothing: if the body raises (Ctrl-C, an error), the engine returns to the state before it.

        Cheap when the body only appends regular tokens (they are truncated again). The
        first change a truncation cannot undo (a compression moving tokens into the store,
        a truncate or reset) snapshots the whole KV state in memory first, with the
        machinery of saved sessions (:mod:`.session`), and a rollback restores it. A
        sliding-window model's window ring overwrites what a truncation would need, so
        its ring (small) is copied at the start.
        """
        if self._checkpoint is not None:  # nested: the outer transaction undoes everything
            yield
            return
        from spindle_local.runtime import engine_state

        self._checkpoint = cp = _Checkpoint(
            tokens=list(self.tokens), next_pos=self.ctx.next_pos, allowance=self._allowance,
            stats=replace(self.stats, extra=dict(self.stats.extra)), queries=self.queries.snapshot(),
            logits=None if self.ctx._logits is None else self.ctx._logits.copy(),
            window=engine_state.window_state(self) if self._windowed and self.tokens else None)
        try:
            yield
        except BaseException:
            self._checkpoint = None
            self._rollback(cp)
            raise
        finally:
            self._checkpoint = None

    def _before_irreversible(self) -> None:
        """Inside a transaction, snapshot the full state once before a change truncate() cannot undo."""
        cp = self._checkpoint
        if cp is None or cp.snapshot is not None:
            return
        self._checkpoint = None  # state_dict() must not recurse into this hook
        try:
            cp.snapshot = self.state_dict()
        finally:
            self._checkpoint = cp

    def _rollback(self, cp: _Checkpoint) -> None:
        """Return to ``cp``: restore the snapshot if one was taken, drop the tokens added since."""
        try:
            if cp.snapshot is not None:
                self.load_state_dict(*cp.snapshot)
            if cp.window is not None:
                from spindle_local.runtime import engine_state

                engine_state.set_window_state(self, cp.window)
            n = len(cp.tokens)
            if self.tokens[:n] != cp.tokens or not self.truncate(n):
                raise SpindleError("internal: the engine cannot return to the state before the interrupted work")
            self.ctx.next_pos = cp.next_pos
            self._allowance = cp.allowance
            self.stats = cp.stats
            self.queries.restore(*cp.queries)
            self.ctx._logits = cp.logits
        except Exception:
            self.reset()  # a consistent empty state; the chat re-reads its conversation
            raise

    # -- look-ahead ----------------------------------------------------------------------------

    def _lookahead_ok(self, unread: int) -> bool:
        """Can a plan made now borrow the queries of the prompt's end (``unread`` tokens still to read)?"""
        return self.config.lookahead and self.rope_ok and unread >= self.config.window

    def _timed_probe(self, tail: Sequence[int], final_pos: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """The look-ahead queries for the plan about to be made: :meth:`_probe`, timed (a probe
        runs only for its plan, so its time is compression's).

        With ``lookahead_reuse`` the prompt's last probe serves again until the tokens read
        have doubled since it was made. Why that can be enough: a probe's queries stand for
        the prompt's end seen without the unread middle, an estimate whatever it has read;
        what a later probe adds is the text read since the last one, a shrinking share of
        what its queries have seen when the refresh is geometric. A prompt of ``n`` tokens
        then costs about ``log2(n / cells)`` probes instead of one per plan.
        """
        last = self._last_probe
        if self.config.lookahead_reuse and last is not None and self.n_past < 2 * last[0]:
            pos, rows = last[1]
            return pos, list(rows)  # a plan drops the rows it has used from its own list
        t0 = time.perf_counter()
        try:
            probe = self._probe(tail, final_pos)
        finally:
            seconds = time.perf_counter() - t0
            self.stats.probe_seconds += seconds
            self.stats.compress_seconds += seconds
            self.stats.probes += 1
        if self.config.lookahead_reuse:
            self._last_probe = (self.n_past, (probe[0], list(probe[1])))
        return probe

    def _probe(self, tail: Sequence[int], final_pos: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Queries of the prompt's last tokens as they would look from here: the look-ahead window.

        A plan made in the middle of a long prompt scores tokens with the queries of the
        last tokens read, which know nothing of the question at the prompt's end; SnapKV
        and PyramidKV see that question because they hold the whole prompt before they
        compress. The probe runs the prompt's last ``window`` tokens right after what has
        been read, captures their queries, and takes them back out of the cache. The
        queries miss the unread middle of the prompt, but they ask the question: tokens
        the question will look for score high before the question is read. RoPE makes a
        query depend on its position only through a rotation, so the probe's queries are
        turned to the positions those tokens will really have (``final_pos`` on).
        Returns (positions [w], per-layer queries [w, H, d]).
        """
        start = self.n_past
        pos = np.arange(start, start + len(tail), dtype=np.int32)
        saved = self.queries.snapshot()
        self.queries.reset()
        self._capture(True)
        try:
            self.ctx.decode(list(tail), pos, logits="last")
            self.queries.collect(self.ctx, pos)
        finally:
            self.ctx.seq_rm(start, -1)
            self.ctx.next_pos = start
        _, rows = self.queries.snapshot()
        self.queries.restore(*saved)
        shift = np.full(len(tail), final_pos - start, dtype=np.int64)
        rows = [None if q is None else roper.rotate(q, shift, **self._rope_args(il)) for il, q in enumerate(rows)]
        return np.arange(final_pos, final_pos + len(tail), dtype=np.int32), rows

    # -- compression -------------------------------------------------------------------------

    def schedule(self) -> Schedule:
        """The compression schedule at this moment (:mod:`.schedule`)."""
        cfg = self.config
        return Schedule(n_past=self.n_past, kv_budget=cfg.kv_budget, bytes_per_token=self.bytes_per_token,
                        window=cfg.window, recent=cfg.recent, sinks=cfg.sinks, keep_start=cfg.keep_start,
                        decode_slack=cfg.decode_slack, prompt_end=self._prompt_end, fixed_bytes=self.fixed_bytes,
                        layout_recent=self.layout.recent if self.layout else None,
                        layout_store_cap=self.layout.store_cap if self.layout else None)

    def _recent(self) -> int:
        return self.schedule().recent_tokens()

    def _protected_start(self) -> int:
        return self.schedule().protected_start()

    def _slack(self) -> int:
        return self.schedule().slack()

    def _compress_due(self, incoming: int) -> bool:
        return compress_due(regular=self.regular_count(), incoming=incoming, cells=self.cells,
                            allowance=self._allowance, capped=self.layout is not None)

    def _needs_compress(self, incoming: int) -> bool:
        return needs_compress(regular=self.regular_count(), incoming=incoming, allowance=self._allowance,
                              capped=self.layout is not None)

    def maybe_compress(self, *, growth: int, force: bool = False,
                       lookahead: tuple[np.ndarray, list[np.ndarray]] | None = None, keep: int = 0) -> bool:
        """Move all but the newest ``max(recent, keep)`` tokens into the store if the budget can pay for it.

        ``growth`` is how many tokens the regular part may gain before the next compression;
        the store is planned small enough that the reserve ratio stays within the budget
        until then. Before the budget can pay for any store (the recent part alone exceeds
        it) nothing is compressed unless ``force`` (the regular cache is full).
        ``lookahead`` (from :meth:`_probe`) adds queries from the prompt's end to the window.
        """
        if self.config.policy == "full" or self.regular_count() <= self._recent():
            return False
        self.policy.context.sinks = self._protected_start()  # the plan keeps the conversation's start
        if self._target_bytes(growth) < self._min_store_bytes() and not force:
            return False
        self._compress(growth=growth, force=force, lookahead=lookahead, keep=keep)
        return True

    def _target_bytes(self, growth: int) -> int:
        return self.schedule().target_bytes(growth)

    def _min_store_bytes(self) -> int:
        # The protected start (sinks and keep_start, as the policy was last told) kept raw in
        # every layer and KV head, plus per-slot bookkeeping.
        lg = self.geometry.layers[0]
        per_slot = lg.n_head_kv * (4 + lg.n_head // lg.n_head_kv + 2 * (lg.head_dim_k + lg.head_dim_v))
        return len(self.store_layer_ids) * max(self.policy.context.sinks, self.config.sinks, 1) * per_slot

    def _compress(self, *, growth: int, force: bool,
                  lookahead: tuple[np.ndarray, list[np.ndarray]] | None = None, keep: int = 0) -> None:
        """Move every regular token older than the newest ``max(recent, keep)`` into the store (re-planned)."""
        t0 = time.perf_counter()
        cut = self.n_past - max(self._recent(), keep)
        if cut <= 0:
            if force:
                raise SpindleError("the regular cache is full and nothing can move to the store; "
                                   "use a larger --ctx or a smaller --recent")
            return
        target = self._target_bytes(growth)
        if target < self._min_store_bytes():
            if not force:
                return
            self.stats.over_budget_compressions += 1
            target = self._min_store_bytes()
        # host-side scores (codebook candidates) use the graph's softmax scale too
        self.policy.context.scale = self.attn_scale(self.store_layer_ids[0])
        source = PlanSource(self, cut, lookahead)
        self.policy.plan_into(source, self.pgeo, target, source.install)
        native.seq_rm(self.ctx, 0, cut)  # the store's cache only: window layers keep their window
        self.ctx.compact()
        self._allowance = self.n_past - cut + growth  # regular tokens the plan leaves room for
        native.scratch_free(self.ctx)  # the score/gather graphs' allocation, kept across the layers
        release_free_memory()
        self.stats.compressions += 1
        self.stats.compress_seconds += time.perf_counter() - t0

    def attn_scale(self, il: int) -> float:
        """The softmax scale of layer ``il``'s attention as the model graph applies it to the
        captured queries (1 for models that scale q beforehand, e.g. Gemma 3 and Phi-3); the
        usual ``1/sqrt(dk)`` until a graph has reported it."""
        if self.graph_attn_scale is None:
            s = native.attn_scale(self.ctx, il)
            self.graph_attn_scale = s if s > 0 else None  # kept (and saved with a session) once seen
        return self.graph_attn_scale or 1.0 / math.sqrt(self.pgeo.head_dim_k)

    def window(self, il: int, lookahead: tuple[np.ndarray, list[np.ndarray]] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Layer ``il``'s window queries [w, H, d] and their positions: the last tokens read, then
        the look-ahead probe's when there is one."""
        q = self.queries.layer(il)
        if q is None:
            raise SpindleError("internal: no window queries captured before compression")
        q_pos = self.queries.positions
        if lookahead is not None:
            if lookahead[1][il] is None:
                raise SpindleError(f"internal: layer {il}'s look-ahead queries were used up by this plan")
            q = np.concatenate([q, lookahead[1][il]])
            q_pos = np.concatenate([q_pos, lookahead[0]])
        return q, q_pos

    def host_layer_input(self, il: int, cut: int, lookahead: tuple[np.ndarray, list[np.ndarray]] | None = None
                         ) -> pin.LayerInput:
        """Layer ``il`` with its vectors on the host: store ∪ regular tokens before ``cut``.

        Only layers that may become codebooks are read this way (the codebook is built from
        the rows themselves); every other layer is planned from scores the runtime computes
        where the KV lives (:mod:`.plan_source`).
        """
        k, v, pos = self.ctx.read_layer_kv(il)
        old = pos < cut
        k_old, v_old, p_old = k[old], v[old], pos[old]
        k_rec, v_rec, p_rec = k[~old], v[~old], pos[~old]
        del k, v
        avail_old = np.ones((len(p_old), self.pgeo.n_head_kv), dtype=bool)
        # pre-RoPE keys only where a codebook may be built (they cost a third of a plan's input)
        wants_pre = self.rope_ok and il in self.store_layer_ids[:self.policy.codebook_candidates(
            len(self.store_layer_ids))]
        k_pre = self._unrope(il, k_old, p_old) if wants_pre else None
        if il in self._store_layers:
            ks, vs, ps, avail, ks_pre, pre_known = self._store_vectors(il)
            if wants_pre:
                # codebook keys are stored before RoPE: only the raw store rows are turned back
                for h in range(self.pgeo.n_head_kv):
                    raw = ~pre_known[:, h]
                    if raw.any():
                        ks_pre[raw, h] = self._unrope(il, ks[raw, h:h + 1], ps[raw])[:, 0]
                k_pre = np.concatenate([ks_pre, k_pre])
            k_old, v_old, p_old, avail_old = (np.concatenate(x) for x in
                                              zip((ks, vs, ps, avail), (k_old, v_old, p_old, avail_old)))
        q, q_pos = self.window(il, lookahead)
        salient = sentence = None
        if self.policy.wants_salience():
            prio, marks = self._salience()
            salient, sentence = prio[p_old], marks[p_old]
        return pin.LayerInput(layer=il, k=k_old, k_pre=k_pre, v=v_old, positions=p_old.astype(np.int32),
                              q_window=q, q_positions=q_pos,
                              k_recent=k_rec, recent_positions=p_rec.astype(np.int32), v_recent=v_rec,
                              available=avail_old, salient=salient, sentence=sentence)

    def install_store(self, il: int, st: LayerStore, source_vnorm: np.ndarray | None = None) -> None:
        """Install a planned store for layer ``il``: gathered where the KV lives when the plan
        names sources, uploaded otherwise (codebooks, sessions); records what it holds.

        ``source_vnorm`` [Hkv, n_sources]: the value norm of every source a gather may name
        (the old store's slots, then the regular cells), from the plan's scores; the new
        slots' norms are kept for the next plan."""
        heads = st.heads
        n_slot_head = np.array([h.n_slots for h in heads], dtype=np.int32)
        S = int(n_slot_head.max()) if len(heads) else 0
        pos = np.zeros((len(heads), S), dtype=np.int32)
        for h, hs in enumerate(heads):
            pos[h, :hs.n_slots] = hs.positions
        vnorm = None
        if S and all(h.source is not None for h in heads):
            g = self.pgeo.g
            src = np.zeros((len(heads), S), dtype=np.int32)
            qmask = np.zeros((len(heads) * g, S), dtype=np.uint8)
            for h, hs in enumerate(heads):
                src[h, :hs.n_slots] = hs.source
                qmask[h * g:(h + 1) * g, :hs.n_slots] = hs.visibility()
            native.store_gather(self.ctx, il, n_slot_head, src, qmask)
            if source_vnorm is not None:
                vnorm = np.take_along_axis(source_vnorm, src, axis=1)
                vnorm[np.arange(S)[None, :] >= n_slot_head[:, None]] = 0.0  # padding slots
        else:
            self.ctx.store_set(il, st)
        if S:
            self._store_layers.add(il)
            self._store_meta[il] = (n_slot_head, pos)
        else:
            self._store_layers.discard(il)
            self._store_meta.pop(il, None)
        self._slot_count.pop(il, None)
        if any(h.count is not None for h in heads):  # tokens each slot stands for, for the next plan
            count = np.ones((len(heads), S), dtype=np.uint8)
            for h, hs in enumerate(heads):
                if hs.count is not None:
                    count[h, :hs.n_slots] = hs.count
            self._slot_count[il] = count
        if vnorm is not None:
            self._slot_vnorm[il] = vnorm.astype(np.float32, copy=False)
        else:
            self._slot_vnorm.pop(il, None)

    def _salience(self) -> tuple[np.ndarray, np.ndarray]:
        """float [n_past]: run priority of the conversation's salient tokens, 0 elsewhere, and
        uint8 [n_past]: each token's sentence marks (policy/salience.py).

        Computed once per set of tokens (every layer of a plan reads it). Which tokens are
        salient is kept from plan to plan and extended by the tokens read since (the
        classification runs in Python, one piece at a time, and would otherwise cost every
        plan time in proportion to the whole conversation); the priorities are numpy."""
        from spindle_local.policy.salience import ECHO, scan_pieces

        memo = self._salient_memo
        if memo is not None and memo.tokens == self.tokens:
            return memo.priority, memo.marks
        done, flags, marks, prev_end = 0, np.zeros(0, dtype=bool), np.zeros(0, dtype=np.uint8), True
        if memo is not None and len(memo.tokens) <= len(self.tokens) and self.tokens[:len(memo.tokens)] == memo.tokens:
            done, flags, marks, prev_end = len(memo.tokens), memo.flags, memo.marks, memo.ended
        pieces = []
        for t in self.tokens[done:]:
            piece = self._pieces.get(t)
            if piece is None:
                piece = self._pieces[t] = self.model.token_to_piece(t)
            pieces.append(piece)
        more, more_marks, prev_end = scan_pieces(pieces, prev_end, int(marks[-1]) if len(marks) else 0)
        flags = np.concatenate([flags, more])
        marks = np.concatenate([marks, more_marks])
        ids = np.asarray(self.tokens)
        prio = self.policy.salient_priority(ids, flags)
        extra = self.policy.salient_marks(ids, flags)
        if extra is not None:  # recomputed whole: a run still being read may change what it restates
            marks = (marks & np.uint8(~ECHO & 0xFF)) | extra
        self._salient_memo = _Salience(list(self.tokens), flags, marks, prev_end, prio)
        return prio, marks

    def _rope_args(self, il: int) -> dict:
        lg = self.geometry.layers[il]
        return dict(base=lg.freq_base, n_rot=lg.n_rot, rope_type=self.geometry.rope_type, freq_scale=lg.freq_scale,
                    factors=self.rope_factors)

    def _unrope(self, il: int, k: np.ndarray, pos: np.ndarray) -> np.ndarray:
        return roper.rotate(k, pos, inverse=True, **self._rope_args(il))

    def _store_vectors(self, il: int) -> tuple[np.ndarray, ...]:
        """The store of layer ``il`` as dense arrays over the union of its slots' positions:
        ``(k, v, positions, available, k_pre, pre_known)``.

        KV heads keep different tokens; a (token, head) pair a head does not hold is
        marked unavailable (zeros in the arrays) so the policy never selects it. Codebook
        keys are kept before RoPE: ``k_pre`` holds them where ``pre_known`` is True.
        """
        store: LayerStore = self.ctx.store_get(il)
        hkv, dk, dv = self.pgeo.n_head_kv, self.pgeo.head_dim_k, self.pgeo.head_dim_v
        union = np.unique(np.concatenate([h.positions for h in store.heads])) if store.heads else np.zeros(0, np.int32)
        m = len(union)
        k = np.zeros((m, hkv, dk), np.float32)
        v = np.zeros((m, hkv, dv), np.float32)
        avail = np.zeros((m, hkv), bool)
        k_pre = np.zeros((m, hkv, dk), np.float32)
        pre_known = np.zeros((m, hkv), bool)
        for h, hs in enumerate(store.heads):
            rows = np.searchsorted(union, hs.positions)
            if hs.k_codebook is not None:
                kp = hs.k_codebook.reconstruct()
                k_pre[rows, h] = kp
                pre_known[rows, h] = True
                k[rows, h] = roper.rotate(kp[:, None, :], hs.positions, **self._rope_args(il))[:, 0]
            else:
                k[rows, h] = hs.k_raw
            v[rows, h] = hs.v_codebook.reconstruct() if hs.v_codebook is not None else hs.v_raw
            avail[rows, h] = True
        return k, v, union.astype(np.int32), avail, k_pre, pre_known

    # -- generation ---------------------------------------------------------------------------

    def generate(self, logits: np.ndarray, *, max_tokens: int, sampler: "Sampler",
                 stop: set[int]) -> Iterator[int]:
        """Yield sampled tokens, feeding each back, until a stop token, ``max_tokens`` or a full context.

        :attr:`finish_reason` says why it ended: ``"stop"`` (an end-of-generation token),
        ``"length"`` (``max_tokens``) or ``"context"`` (no room for another token: the
        token is not yielded). Every yielded token is fed before the next one is sampled;
        a cancel raises :class:`Interrupted` before the next token is sampled, or after a
        yield, before that token is fed: the engine holds the prompt plus the tokens
        accepted so far.
        """
        limit = self.context_limit()[0]
        self.finish_reason = "length"
        for _ in range(max_tokens):
            self.cancel.check()  # Ctrl-C during the last step: nothing more is shown
            tok = sampler.sample(logits)
            if tok in stop:
                self.finish_reason = "stop"
                return
            if self.n_past + 1 > limit:
                self.finish_reason = "context"
                return
            yield tok
            self.cancel.check()
            logits = self.step(tok)


class Sampler:
    """Temperature / top-k / top-p sampling with its own seeded generator (0 = greedy)."""

    def __init__(self, temperature: float = 0.7, top_k: int = 40, top_p: float = 0.95, seed: int | None = None):
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.rng = np.random.default_rng(seed)

    def sample(self, logits: np.ndarray) -> int:
        if self.temperature <= 0:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / self.temperature
        k = min(self.top_k, x.shape[0]) if self.top_k > 0 else x.shape[0]
        idx = np.argpartition(-x, k - 1)[:k]
        idx = idx[np.argsort(-x[idx])]
        p = np.exp(x[idx] - x[idx[0]])
        p /= p.sum()
        keep = int(np.searchsorted(np.cumsum(p), self.top_p) + 1)
        idx, p = idx[:keep], p[:keep] / p[:keep].sum()
        return int(self.rng.choice(idx, p=p))
