"""Time to first token of a follow-up chat turn, with prefix reuse and without.

Builds a conversation of about ``--context`` tokens (user turns quoting the pydoc corpus,
short fixed assistant turns), then asks ``--runs`` follow-up questions. Each question is
timed twice on the same messages, through the method the server calls
(``ServingChatModel.stream_chat``):

* reuse: the engine still holds the conversation so far (what a chat client that
  resends its whole history gets from ``spindle-local serve``);
* fresh: the engine is reset first, so the whole conversation is prefilled.

Prints the median of each (and the per-run figures). Usage:

    .venv/bin/python scripts/bench_ttft.py [--context 4000] [--runs 3] [--policy spindle] [--kv-budget 0.25]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF model (default: the default model)")
    ap.add_argument("--context", type=int, default=4000, help="conversation length in tokens")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--policy", default="spindle")
    ap.add_argument("--kv-budget", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from spindle_local.eval.texts import pydoc_text
    from spindle_local.runtime.config import EngineConfig
    from spindle_local.runtime.loader import load_llama_cpp
    from spindle_local.runtime.model_files import resolve_model

    load_llama_cpp()
    from spindle_local.runtime.engine_chat import CompletionResult, CompletionSettings, ServingChatModel

    cfg = EngineConfig(policy=args.policy, kv_budget=args.kv_budget, n_threads=args.threads)
    model = ServingChatModel(resolve_model(args.model, quiet=True), cfg)
    settings = CompletionSettings(max_tokens=args.answer_tokens, temperature=0.0)

    # A conversation of about --context tokens: pasted passages with short replies.
    text = pydoc_text()
    messages = [{"role": "system", "content": "You are a helpful assistant who answers briefly."}]
    pos = 0
    while len(model.chat_prompt_tokens(messages)) < args.context - 300:
        messages.append({"role": "user", "content": "Read this:\n" + text[pos:pos + 2000]})
        messages.append({"role": "assistant", "content": "Done. Ask me about it."})
        pos += 2000

    def turn(msgs: list[dict[str, str]]) -> tuple[float, str]:
        """Run one turn to the end; return (seconds to the first text, the answer)."""
        t0 = time.perf_counter()
        first = None
        parts = []
        for piece in model.stream_chat(msgs, settings, CompletionResult()):
            if first is None:
                first = time.perf_counter() - t0
            parts.append(piece)
        return (first if first is not None else time.perf_counter() - t0), "".join(parts)

    questions = ["What is this text about?", "Give one keyword from it.", "Is there any code in it?",
                 "Summarise the last passage.", "Name one Python statement it mentions.",
                 "What would you read next?", "Which word is the most frequent?"]
    warm_q = {"role": "user", "content": "Say ok."}
    _, answer = turn(messages + [warm_q])  # the engine now holds the conversation
    messages += [warm_q, {"role": "assistant", "content": answer}]

    reuse_t, fresh_t, sizes = [], [], []
    for i in range(args.runs):
        messages.append({"role": "user", "content": questions[i % len(questions)]})
        t_reuse, answer = turn(messages)
        prefilled = model.reuse.last_prefilled_tokens
        model.engine.reset()
        t_fresh, _ = turn(messages)
        messages.append({"role": "assistant", "content": answer})
        reuse_t.append(t_reuse)
        fresh_t.append(t_fresh)
        sizes.append(model.reuse.last_prompt_tokens)
        print(f"run {i + 1}: prompt {model.reuse.last_prompt_tokens} tokens; reuse: prefilled {prefilled}, "
              f"TTFT {t_reuse * 1000:.0f} ms; fresh: TTFT {t_fresh * 1000:.0f} ms")
    s = model.engine.refresh_stats()
    print(f"policy {cfg.policy}, kv budget {cfg.kv_budget}, reserve ratio now {s.reserve_ratio:.3f}, "
          f"prompt {min(sizes)}-{max(sizes)} tokens, {args.runs} runs")
    print(f"TTFT follow-up with prefix reuse: {statistics.median(reuse_t) * 1000:.0f} ms (median)")
    print(f"TTFT follow-up without reuse:     {statistics.median(fresh_t) * 1000:.0f} ms (median)")
    model.close()


if __name__ == "__main__":
    main()
