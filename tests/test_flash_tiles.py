"""The patched CPU flash-attention tiles: a ubatch of 32-63 query rows (a look-ahead probe, a
short question) takes the tiled kernel in 32-row tiles, one tile of one head per chunk, instead
of ggml's per-row kernel (``patches/README.md``, hooks); 64 rows or more run as in ggml. Each
row of a tile is computed on its own, so a row's attention must not depend on the tile height
or on how the ubatch was cut: the rows of a short ubatch equal, to the bit, the same rows of a
128-row ubatch (64-row tiles, unchanged by the patch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spindle_local.runtime.engine import Engine, EngineConfig

pytestmark = pytest.mark.model


def _logits(eng: Engine, tokens: list[int], step: int) -> np.ndarray:
    """Logits of every token of ``tokens`` decoded after what ``eng`` holds, ``step`` tokens per
    ubatch; the tokens are taken back out of the cache afterwards."""
    ctx = eng.ctx
    start = eng.n_past
    rows = []
    try:
        for a in range(0, len(tokens), step):
            part = tokens[a:a + step]
            ctx.decode(part, np.arange(start + a, start + a + len(part), dtype=np.int32), logits="all")
            rows.append(np.array(ctx.logits(), dtype=np.float32).reshape(len(part), -1))
    finally:
        ctx.seq_rm(start, -1)
        ctx.next_pos = start
    return np.concatenate(rows)


@pytest.mark.parametrize("policy", ["full", "spindle"])
def test_short_ubatch_rows_equal_the_long_ubatch_rows(default_model: Path, pydoc_tokens: list[int],
                                                      policy: str) -> None:
    cfg = EngineConfig(policy=policy, kv_budget=0.25, n_threads=2, flash_attn=True,
                       **({"n_cells": 2048, "max_tokens": 2048} if policy == "full" else {}))
    with Engine(default_model, cfg) as eng:
        eng.feed(pydoc_tokens[:1500])
        if policy == "spindle":
            assert eng.refresh_stats().compressions >= 1  # the rows attend over a store too
        tail = pydoc_tokens[1500:1628]
        ref = _logits(eng, tail, len(tail))
        assert np.isfinite(ref).all()
        for n in (32, 47, 63, 64, 100):
            got = _logits(eng, tail[:n], n)
            np.testing.assert_array_equal(got, ref[:n], err_msg=f"{n}-row ubatch")
