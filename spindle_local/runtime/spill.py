"""Host-side copies of the rows a long prompt pushes out of the regular cache.

A prompt longer than the regular cache is compressed several times while it is read.
Without a spill, whatever such a mid-prompt plan drops is gone before the prompt's end
(where the question usually is) can vote for it: a pass key near the start of a long
document survives only if every earlier plan happened to keep it. The spill keeps an
exact f16 copy of every row that left the regular cache during the current prompt, so
the end-of-prompt plan (the one that decides what is kept) chooses among all of the
prompt's tokens, as SnapKV-style methods do when they hold the whole prompt. Mid-prompt
plans do not read it: their cost stays bounded by the regular cache.

It lives only while ``Engine.feed`` reads one prompt and costs host memory of
``2 bytes × (K + V values per token) × evicted tokens`` (23 KB per token for SmolLM2-135M),
never KV-cache memory: the reserve ratio after the prompt is unchanged.
"""

from __future__ import annotations

import numpy as np


class PromptSpill:
    """Per-layer f16 K (post-RoPE), V and positions of the rows evicted during one prompt."""

    def __init__(self) -> None:
        self._layers: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self.closed = False  # set before the prompt's last plan: nothing after it could use new rows

    def add(self, layer: int, k: np.ndarray, v: np.ndarray, positions: np.ndarray) -> None:
        """Record rows leaving layer ``layer`` now (ignored once closed)."""
        if len(positions) and not self.closed:
            self._layers.setdefault(layer, []).append(
                (k.astype(np.float16), v.astype(np.float16), np.asarray(positions, np.int32)))

    def rows(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Layer ``layer``'s spilled K, V (f16) and positions (int32), oldest first; None if empty.

        Concatenated here, once, by the prompt's last plan: the mid-prompt plans that add
        rows never read them, so nothing is copied per plan.
        """
        chunks = self._layers.get(layer)
        if not chunks:
            return None
        if len(chunks) > 1:
            chunks[:] = [tuple(np.concatenate(x) for x in zip(*chunks))]  # type: ignore[list-item]
        return chunks[0]

    def nbytes(self) -> int:
        return sum(a.nbytes for chunks in self._layers.values() for c in chunks for a in c)
