"""Replay the multi-question draws of one seed at one document length and follow the needles
through every plan: how much of each needle each plan keeps, in every layer and KV head.

The draws are those of ``spindle-local eval needle --protocol multi --seed SEED`` with the
lengths and samples of ``scripts/retrieval_draws.sh multi`` (1,000 / 3,000 / 6,000 tokens, two
documents a length); only the documents of ``--length`` are run, with the full cache and the
compressed one, one thread. Per document it prints each question's answer, whether it holds
the key and the key's log-probability (full | compressed), then one line per plan::

    plan@2982: Kwame@0.1 0.91/0.91 ... | slots 128-430, salient 96, copy spans 43

where ``0.91/0.91`` is the share of the needle's tokens held, mean and minimum over the
(layer, KV head) pairs, ``slots`` the smallest and largest layer, ``salient`` and ``copy
spans`` the tokens those stages protected. A last line sums the keys::

    python scripts/trace_multi.py --seed 0 --length 3000 --kv-budget 0.15
    python scripts/trace_multi.py --seed 0 --length 3000 --kv-budget 0.15 --set allocator.min_slots=256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spindle_local.eval.needle import (  # noqa: E402
    DEFAULT_NAMED_NEEDLE, DEFAULT_NAMED_QUESTION, EnginePair, NeedleBuilder, converse, draw_multi, key_found,
)
from spindle_local.eval.runner import Conversation  # noqa: E402
from spindle_local.eval.texts import load_text  # noqa: E402
from spindle_local.runtime import engine as engine_module  # noqa: E402
from spindle_local.runtime.config import EngineConfig  # noqa: E402
from spindle_local.runtime.model_files import default_model_path  # noqa: E402

LENGTHS, DEPTHS, SAMPLES = (1000, 3000, 6000), (0.1, 0.5, 0.9), 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--length", type=int, required=True, choices=LENGTHS)
    ap.add_argument("--kv-budget", type=float, default=0.25)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="stage setting (repeatable)")
    args = ap.parse_args()
    if any("=" not in a for a in args.set):
        ap.error("--set takes KEY=VALUE")
    stages = dict(a.split("=", 1) for a in args.set)
    cfg = EngineConfig(kv_budget=args.kv_budget, n_threads=1, stages=stages)
    longest = max(LENGTHS) + 16 + 3 * (96 + 8)
    rng = np.random.default_rng(args.seed)

    # The plans are read where the engine installs them: per plan (keyed by n_past), each
    # layer's per-head positions, and the policy's report once the plan has ended.
    installed: dict[int, dict[int, list[np.ndarray]]] = {}
    reports: dict[int, list[dict]] = {}
    install, compress = engine_module.Engine.install_store, engine_module.Engine.maybe_compress

    def recording(self, il, st, source_vnorm=None):
        install(self, il, st, source_vnorm)
        if self is pair.comp:
            installed.setdefault(self.n_past, {})[il] = [np.asarray(h.positions) for h in st.heads]

    def reporting(self, **kw):
        out = compress(self, **kw)
        if self is pair.comp and self.n_past in installed and self.n_past not in reports:
            reports[self.n_past] = self.policy.last_report  # the plan's report, written when it ends
        return out

    engine_module.Engine.install_store = recording
    engine_module.Engine.maybe_compress = reporting
    totals = [0, 0, 0]  # found by both, by the full cache, by the compressed cache
    with EnginePair(str(default_model_path()), cfg, longest) as pair:
        builder = NeedleBuilder(pair.tokenize, pair.model.token_to_piece, load_text(None),
                                needle=DEFAULT_NAMED_NEEDLE, question=DEFAULT_NAMED_QUESTION)
        for length in LENGTHS:
            for _ in range(SAMPLES):
                p = draw_multi(builder, rng, length, DEPTHS)
                if length != args.length:
                    continue
                spans = []
                for i, start in enumerate(p.needle_starts):
                    n_tok = len(pair.tokenize("\n" + DEFAULT_NAMED_NEEDLE.format(key=p.keys[i], name=p.names[i]) + "\n"))
                    spans.append((f"{p.names[i]}@{p.depths[i]}", np.arange(start + 1, start + n_tok)))
                installed.clear()
                reports.clear()
                ref = converse(Conversation(pair.full), p, pair.tokenize, 8)
                got = converse(Conversation(pair.comp), p, pair.tokenize, 8)
                print(f"document of {len(p.document)} tokens, keys {p.keys}, asked {[p.names[i] for i in p.order]}")
                for i, r, g in zip(p.order, ref, got):
                    ok_r, ok_g = key_found(r.answer, p.keys[i]), key_found(g.answer, p.keys[i])
                    totals[0] += ok_r and ok_g
                    totals[1] += ok_r
                    totals[2] += ok_g
                    print(f"  {p.names[i]}@{p.depths[i]} {p.keys[i]}: full {r.answer!r} {ok_r} {r.logprob:.2f} | "
                          f"compressed {g.answer!r} {ok_g} {g.logprob:.2f}")
                for n_past, layers in sorted(installed.items()):
                    held = []
                    for name, toks in spans:
                        shares = [np.isin(toks, pos).mean() for heads in layers.values() for pos in heads]
                        held.append(f"{name} {np.mean(shares):.2f}/{np.min(shares):.2f}")
                    rep = reports[n_past]
                    slots = [r["slots"] for r in rep]
                    print(f"    plan@{n_past}: {' '.join(held)} | slots {min(slots)}-{max(slots)}, "
                          f"salient {rep[0].get('salient_tokens', 0)}, copy spans "
                          f"{max(r.get('copy_span_tokens', 0) for r in rep)}")
    print(f"keys found by both {totals[0]} / by the full cache {totals[1]}; by the compressed cache {totals[2]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
