"""How far a store holding every token is from the full cache, next to how far the full cache
is from itself when only the arithmetic changes, on whatever backend the library places the
layers on (a GPU build puts them all there).

On the CPU a store of every token reproduces the full cache's logits exactly; a GPU's
kernels depend on the shapes they are given (a 9-slot cache or a 512-slot one, one token or
two, flash attention or not), so the full cache already moves there when nothing but the
shapes change. This prints both, per prompt and flash-attention setting, as JSON lines:

    python scripts/backend_controls.py [--model PATH] [--gpu-layers N] [--families]

``--families`` adds tiny random-weight models of the common families (the attention shapes
of tests/test_families.py), 262 random tokens each.

Each row compares one run with the reference (the full cache, the last token decoded alone):
``store`` moves all but the last 8 cached tokens into the store first; ``batch2`` decodes
the last two tokens together; ``ctx2x`` uses a context twice as large; ``flash`` toggles
flash attention; ``cpu`` runs the reference on the CPU (no layer offloaded). Measures:
the largest logit difference, KL(reference || run) of the next-token distributions, and
whether the top token agrees.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from spindle_local.eval.texts import load_text, prefix_tokens
from spindle_local.runtime.lowlevel import LlamaContext, LlamaModel
from spindle_local.runtime.model_files import default_model_path
from spindle_local.testing.tiny_families import write_tiny_family

COUNTING = "".join(f"{i}, " for i in range(1, 60)) + "60,"
# (family, n_head, n_head_kv, head_dim, n_embd): query heads per KV head 1-8, head sizes 64-256
FAMILY_CASES = [
    ("llama", 8, 1, 64, 128),
    ("llama", 3, 1, 256, 96),
    ("qwen2", 4, 4, 64, 256),
    ("qwen3", 8, 2, 128, 128),
    ("phi3", 3, 1, 128, 384),
    ("mistral", 7, 1, 128, 128),
]


def _logits(model: LlamaModel, tokens: list[int], *, flash: bool, n_ctx: int, last: int = 1,
            store: bool = False) -> np.ndarray:
    with LlamaContext(model, n_ctx=n_ctx, n_batch=128, flash_attn=flash) as ctx:
        ctx.decode(tokens[:-last], logits="none")
        if store:
            ctx.move_to_store(0, len(tokens) - 9)  # 8 tokens stay in the regular cache
        ctx.decode(tokens[-last:])
        return ctx.logits().astype(np.float64).copy()


def _compare(ref: np.ndarray, got: np.ndarray) -> dict:
    def logp(x: np.ndarray) -> np.ndarray:
        x = x - x.max()
        return x - np.log(np.exp(x).sum())

    lp, lq = logp(ref), logp(got)
    return {"max_abs": float(np.abs(ref - got).max()),
            "kl": float((np.exp(lp) * (lp - lq)).sum()),
            "top1_same": bool(ref.argmax() == got.argmax())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the default model)")
    ap.add_argument("--gpu-layers", type=int, default=None, help="layers offloaded (default: llama.cpp's, all)")
    ap.add_argument("--doc-tokens", type=int, default=1000, help="length of the text prompt")
    ap.add_argument("--families", action="store_true", help="also tiny random models of the common families")
    args = ap.parse_args(argv)
    path = args.model or str(default_model_path(fetch=False))
    model = LlamaModel(path, n_gpu_layers=args.gpu_layers)
    tok = lambda t: model.tokenize(t, add_special=False)  # noqa: E731
    prompts = {"counting": model.tokenize(COUNTING), "text": prefix_tokens(tok, load_text(None), args.doc_tokens)}
    model.close()
    _rows(path, args.gpu_layers, prompts)
    if args.families:
        rng = np.random.default_rng(5)
        with tempfile.TemporaryDirectory(prefix="spindle-controls-") as tmp:
            for i, (family, n_head, n_head_kv, head_dim, n_embd) in enumerate(FAMILY_CASES):
                spec = write_tiny_family(Path(tmp) / f"{i}.gguf", family, n_head=n_head, n_head_kv=n_head_kv,
                                         head_dim=head_dim, n_embd=n_embd, seed=31 + i)
                toks = [int(t) for t in rng.integers(3, spec.n_vocab - 1, 262)]
                _rows(str(spec.path), args.gpu_layers, {f"{family}-h{n_head}-kv{n_head_kv}-d{head_dim}": toks})
    return 0


def _rows(path: str, gpu_layers: int | None, prompts: dict[str, list[int]]) -> None:
    model = LlamaModel(path, n_gpu_layers=gpu_layers)
    cpu = LlamaModel(path, n_gpu_layers=0)
    for name, tokens in prompts.items():
        n_ctx = 512 if len(tokens) < 400 else 2048
        for flash in (False, True):
            ref = _logits(model, tokens, flash=flash, n_ctx=n_ctx)
            runs = {
                "store": _logits(model, tokens, flash=flash, n_ctx=n_ctx, store=True),
                "batch2": _logits(model, tokens, flash=flash, n_ctx=n_ctx, last=2),
                "ctx2x": _logits(model, tokens, flash=flash, n_ctx=2 * n_ctx),
                "flash": _logits(model, tokens, flash=not flash, n_ctx=n_ctx),
                "cpu": _logits(cpu, tokens, flash=flash, n_ctx=n_ctx),
            }
            for run, got in runs.items():
                row = {"prompt": name, "tokens": len(tokens), "flash": flash, "run": run, **_compare(ref, got)}
                print(json.dumps(row), flush=True)
    model.close()
    cpu.close()


if __name__ == "__main__":
    sys.exit(main())
