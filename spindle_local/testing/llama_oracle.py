"""Minimal llama.cpp runner (via llama-cpp-python's low-level ctypes API) for tests.

Feeds token ids directly (no tokenizer, no BOS) and returns the logits of every fed
token, so stock llama.cpp can serve as the oracle for the numpy reference forward.
Works with stock or patched llama-cpp-python alike (only stock API is used).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["LlamaOracle", "quiet_llama_logs"]

_LOG_CB: Any = None  # keep the ctypes callback alive for the process lifetime


def quiet_llama_logs() -> None:
    """Silence llama.cpp's stderr logging (load/graph chatter) for the process."""
    global _LOG_CB
    import llama_cpp.llama_cpp as L

    if _LOG_CB is None:
        _LOG_CB = L.llama_log_callback(lambda level, text, user: None)
        L.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


class LlamaOracle:
    """One llama.cpp model + context (single sequence 0, f16 KV cache by default).

    ``flash_attn``: True / False / None (llama.cpp's "auto", which enables it on CPU).
    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_ctx: int = 512,
        n_batch: int | None = None,
        flash_attn: bool | None = None,
        n_threads: int = 2,
        quiet: bool = True,
    ) -> None:
        import llama_cpp.llama_cpp as L

        self._L = L
        if quiet:
            quiet_llama_logs()
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(Path(path)).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp failed to load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch or n_ctx
        cp.n_ubatch = n_batch or n_ctx
        cp.n_seq_max = 1
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        cp.flash_attn_type = {
            None: L.LLAMA_FLASH_ATTN_TYPE_AUTO,
            True: L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            False: L.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash_attn]
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise RuntimeError("llama.cpp failed to create a context")
        self.n_vocab = int(L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model)))
        self.n_batch = int(cp.n_batch)

    def clear(self) -> None:
        """Empty the KV cache."""
        L = self._L
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)

    def decode(self, tokens: Sequence[int], positions: Sequence[int] | None = None, *, start: int = 0) -> np.ndarray:
        """Decode ``tokens`` (ids) into sequence 0 and return logits ``[n, n_vocab]`` (f32).

        Positions default to ``start, start+1, ...``; the cache keeps what earlier
        calls decoded, so a second call continues the sequence.
        """
        L = self._L
        tok = [int(t) for t in tokens]
        n = len(tok)
        pos = list(range(start, start + n)) if positions is None else [int(p) for p in positions]
        if len(pos) != n:
            raise ValueError("positions and tokens differ in length")
        out = np.empty((n, self.n_vocab), dtype=np.float32)
        for c0 in range(0, n, self.n_batch):
            c1 = min(n, c0 + self.n_batch)
            batch = L.llama_batch_init(c1 - c0, 0, 1)
            try:
                for i in range(c0, c1):
                    j = i - c0
                    batch.token[j] = tok[i]
                    batch.pos[j] = pos[i]
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = 1
                batch.n_tokens = c1 - c0
                rc = L.llama_decode(self.ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc}")
                for i in range(c0, c1):
                    ptr = L.llama_get_logits_ith(self.ctx, i - c0)
                    out[i] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
            finally:
                L.llama_batch_free(batch)
        return out

    def close(self) -> None:
        """Free context and model (idempotent)."""
        L = self._L
        if getattr(self, "ctx", None):
            L.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            L.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "LlamaOracle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort
        try:
            self.close()
        except Exception:
            pass
