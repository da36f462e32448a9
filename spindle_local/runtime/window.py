"""The window queries: post-RoPE Q of the most recent tokens, every layer.

Eviction scores come from the real queries of the last ``w`` tokens, taken during their
own forward pass. The patch copies them on each layer's backend while capture is armed
(``llama_spindle_capture``: the last ``w`` query rows of every ubatch, written by the graph
itself, so it works wherever the layer runs: CPU, GPU or an RPC server), and
:meth:`WindowQueries.collect` reads the small result (``w × n_head × d`` floats per
layer) after the decode. The engine keeps the newest ``w`` rows of each layer on the host
with their positions: a saved session carries them, and a look-ahead probe turns them by
RoPE to the positions they will have.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spindle_local.runtime import native


class WindowQueries:
    """Keeps the last ``window`` query rows of each layer, with their positions."""

    def __init__(self, n_layer: int, window: int, n_head: int = 0, head_dim: int = 0,
                 layers: list[int] | None = None) -> None:
        self.n_layer = n_layer
        self.layers = list(range(n_layer)) if layers is None else list(layers)  # those captured
        self.window = window
        self.n_head = n_head
        self.head_dim = head_dim
        self._q: list[np.ndarray | None] = [None] * n_layer
        self._pos = np.zeros(0, dtype=np.int32)

    def collect(self, ctx: Any, positions: np.ndarray) -> None:
        """Read the rows the last decode captured (its last tokens, at ``positions``) and keep
        the newest ``window`` of each layer."""
        positions = np.asarray(positions, dtype=np.int32)
        new_pos = None
        for il in self.layers:
            rows = native.capture_read(ctx, il, self.window, self.n_head, self.head_dim)
            if rows.shape[0] == 0:
                continue
            pos = positions[-rows.shape[0]:]
            prev = self._q[il]
            merged = rows if prev is None or len(self._pos) == 0 else np.concatenate([prev, rows])
            # a copy: a view would keep the whole joined array (twice the window) alive
            self._q[il] = merged[-self.window:].copy() if merged.shape[0] > self.window else merged
            if new_pos is None:
                merged_pos = pos if len(self._pos) == 0 else np.concatenate([self._pos, pos])
                new_pos = merged_pos[-self.window:].copy()
        if new_pos is not None:
            self._pos = new_pos.astype(np.int32)

    def truncate(self, n: int) -> None:
        """Drop captured rows at positions >= ``n`` (the tokens were taken back)."""
        keep = self._pos < n
        if keep.all():
            return
        self._q = [None if q is None else q[keep[-q.shape[0]:]] for q in self._q]
        self._pos = self._pos[keep]

    def reset(self) -> None:
        self._q = [None] * self.n_layer
        self._pos = np.zeros(0, dtype=np.int32)

    def snapshot(self) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """(positions, per-layer rows), copied — what a saved session keeps and a look-ahead
        probe puts back after it has used the window."""
        return self._pos.copy(), [None if q is None else q.copy() for q in self._q]

    def restore(self, positions: np.ndarray, rows: list[np.ndarray | None]) -> None:
        if len(rows) != self.n_layer:
            raise ValueError(f"{len(rows)} layers of window queries for a {self.n_layer}-layer model")
        self.reset()
        self._pos = np.asarray(positions, dtype=np.int32)
        self._q = [None if r is None else np.asarray(r, dtype=np.float32) for r in rows]

    def nbytes(self) -> int:
        """Host bytes the kept rows take."""
        return int(sum(q.nbytes for q in self._q if q is not None) + self._pos.nbytes)

    @property
    def positions(self) -> np.ndarray:
        return self._pos

    def layer(self, il: int) -> np.ndarray | None:
        """[w, H, d] post-RoPE queries of layer ``il`` (None before any capture)."""
        return self._q[il]

    @property
    def ready(self) -> bool:
        return all(self._q[il] is not None for il in self.layers) and len(self._pos) > 0
