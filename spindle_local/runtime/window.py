"""Capturing the window queries: post-RoPE Q of the most recent tokens, every layer.

Eviction scores come from the real queries of the last ``w`` tokens, taken during their
own forward pass through llama.cpp's eval callback (the graph names them ``Qcur-<il>``;
the post-RoPE node is the last one of that name in graph order, so the last value seen
wins). The callback answers "no" to every node while disabled, so decoding without
capture costs one cheap Python call per graph node.
"""

from __future__ import annotations

import numpy as np

from spindle_local.runtime.lowlevel import TensorView


class WindowQueries:
    """Keeps the last ``window`` query rows of each layer, with their positions."""

    def __init__(self, n_layer: int, window: int) -> None:
        self.n_layer = n_layer
        self.window = window
        self.enabled = False
        self._names = {f"Qcur-{il}": il for il in range(n_layer)}
        self._q: list[np.ndarray | None] = [None] * n_layer
        self._pos = np.zeros(0, dtype=np.int32)
        self._pending: dict[int, np.ndarray] = {}

    def __call__(self, ptr: int, ask: bool) -> bool:
        if not self.enabled:
            return False
        view = TensorView(ptr)
        il = self._names.get(view.name)
        if il is None:
            return False
        if ask:
            return True
        arr = view.numpy()  # [n_tokens, H, d] for a [d, H, n_tokens] tensor
        if arr.ndim == 4:
            arr = arr.reshape(arr.shape[-3:]) if arr.shape[0] == 1 else arr.reshape(-1, *arr.shape[-2:])
        self._pending[il] = arr[-self.window:].astype(np.float32, copy=True)
        return True

    def commit(self, positions: np.ndarray) -> None:
        """Attach the positions of the batch just decoded; keep the newest ``window`` rows."""
        if not self._pending:
            return
        positions = np.asarray(positions, dtype=np.int32)
        for il, rows in self._pending.items():
            pos = positions[-rows.shape[0]:]
            prev = self._q[il]
            merged = rows if prev is None or len(self._pos) == 0 else np.concatenate([prev, rows])
            self._q[il] = merged[-self.window:]
            if il == 0:
                merged_pos = pos if len(self._pos) == 0 else np.concatenate([self._pos, pos])
                new_pos = merged_pos[-self.window:]
        self._pos = new_pos.astype(np.int32)
        self._pending.clear()

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
        self._pending.clear()

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

    @property
    def positions(self) -> np.ndarray:
        return self._pos

    def layer(self, il: int) -> np.ndarray | None:
        """[w, H, d] post-RoPE queries of layer ``il`` (None before any capture)."""
        return self._q[il]

    @property
    def ready(self) -> bool:
        return all(q is not None for q in self._q) and len(self._pos) > 0
