"""The ``spindle-local`` command line: thin click commands over the runtime.

Every user-facing failure is a :class:`~spindle_local.errors.SpindleError`: it is printed
as one ``error: ...`` line on stderr and the process exits with the error's status
(2 for bad input, 3 for a missing/unpatched runtime, 4 for a failed build).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from spindle_local import __version__
from spindle_local.errors import SpindleError, UsageError

MODEL_ARG_HELP = "GGUF model file (default: SmolLM2-135M-Instruct, fetched on first use)."


def _fail(err: SpindleError) -> None:
    click.echo(f"error: {err}", err=True)
    sys.exit(err.exit_code)


class _Group(click.Group):
    """A group that turns SpindleError (and Ctrl-C outside a chat) into one clean line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SpindleError as e:
            _fail(e)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="spindle-local")
def main() -> None:
    """Run GGUF language models locally with a compressed (SpindleKV) KV cache.

    \b
    Quick start:
      spindle-local setup          build the patched llama.cpp runtime, fetch the default model
      spindle-local chat           chat with the default model
      spindle-local info MODEL     show a model's attention geometry and KV-cache cost
    """


@main.command()
@click.option("--backend", type=click.Choice(["cpu", "cuda", "metal"]), default="cpu", show_default=True,
              help="llama.cpp backend to build.")
@click.option("--force", is_flag=True, help="Rebuild the runtime even if a cached build exists.")
@click.option("--no-model", is_flag=True, help="Do not fetch the default model.")
@click.option("--stock", is_flag=True,
              help="Also build an unpatched llama.cpp library, used by benchmarks as the baseline.")
def setup(backend: str, force: bool, no_model: bool, stock: bool) -> None:
    """Build and install the patched runtime and fetch the default model.

    The build is cached (keyed by llama-cpp-python version, patch digest and build
    flags); running setup again with nothing changed takes seconds.
    """
    from spindle_local.runtime.build import BuildConfig, ensure_runtime, ensure_stock_library
    from spindle_local.runtime.model_files import default_model_path

    extra = tuple(os.environ.get("SPINDLE_CMAKE_ARGS", "").split())
    report = ensure_runtime(BuildConfig(backend=backend, extra_cmake_args=extra), force=force)
    click.echo(f"runtime: {report['key']} ({report['action']}, {report['seconds']:.1f} s)")
    if stock:
        click.echo(f"stock library: {ensure_stock_library(BuildConfig(backend=backend, extra_cmake_args=extra))}")
    if not no_model:
        click.echo(f"default model: {default_model_path()}")


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(model: Path | None, as_json: bool) -> None:
    """Show MODEL's attention geometry and the full-cache KV bytes per token."""
    from spindle_local.runtime.gguf_meta import read_meta
    from spindle_local.runtime.model_files import resolve_model

    meta = read_meta(resolve_model(model))
    if as_json:
        click.echo(json.dumps(meta.as_dict(), indent=2))
        return
    g = meta.n_head // max(meta.n_head_kv, 1)
    rows = [
        ("model", meta.name),
        ("file", meta.path),
        ("architecture", meta.architecture),
        ("layers", meta.n_layer),
        ("query heads", meta.n_head),
        ("KV heads", f"{meta.n_head_kv} (GQA group of {g})" if g > 1 else f"{meta.n_head_kv} (MHA)"),
        ("head size K / V", f"{meta.head_dim_k} / {meta.head_dim_v}"),
        ("trained context", meta.n_ctx_train),
        ("RoPE base", meta.rope_freq_base),
        ("sliding window", meta.sliding_window or "none"),
        ("KV bytes/token (f16)", f"{meta.kv_bytes_per_token_f16:,}"),
        ("full KV cache at trained ctx", _mib(meta.kv_bytes_per_token_f16 * meta.n_ctx_train)),
        ("KV compression", "supported" if meta.compressible else "not yet (full cache only)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _codebook_layers(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter("must be a number of layers or 'auto'") from None
    if n < 0:
        raise click.BadParameter("must be >= 0")
    return n


def engine_options(f):
    """The compression options every model-running command shares."""
    options = [
        click.option("--policy", type=click.Choice(["full", "streaming", "snapkv", "pyramidkv", "spindle"]),
                     default="spindle", show_default=True, help="KV-cache policy; 'full' keeps everything."),
        click.option("--kv-budget", type=float, default=0.25, show_default=True,
                     help="Reserve ratio: KV bytes held / full f16 cache bytes, in (0, 1]."),
        click.option("--window", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Observation window: recent queries that score older tokens."),
        click.option("--sinks", type=click.IntRange(min=0), default=4, show_default=True,
                     help="First tokens that are never evicted (attention sinks)."),
        click.option("--recent", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Newest tokens kept uncompressed in the regular cache."),
        click.option("--codebook-layers", default="auto", show_default=True,
                     help="Shallow layers that use codebook replacement: a number, or 'auto' to measure."),
        click.option("--theta-k", type=click.FloatRange(0, 1, min_open=True), default=0.98, show_default=True,
                     help="Cosine threshold for sharing a key codebook entry."),
        click.option("--theta-v", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
                     help="Cosine threshold for sharing a value codebook entry."),
        click.option("--chunk", type=click.IntRange(min=16), default=512, show_default=True,
                     help="Prefill chunk size in tokens (compression runs between chunks)."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores)."),
        click.option("--flash-attn/--no-flash-attn", default=True, show_default=True,
                     help="Use llama.cpp's flash-attention kernels."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def engine_config(*, policy: str, kv_budget: float, window: int, sinks: int, recent: int, codebook_layers: str,
                  theta_k: float, theta_v: float, chunk: int, threads: int | None, flash_attn: bool,
                  max_tokens: int | None = None, n_cells: int | None = None):
    from spindle_local.runtime.engine import EngineConfig

    try:
        cb = _codebook_layers(codebook_layers)
    except click.BadParameter as e:
        raise click.BadParameter(str(e), param_hint="'--codebook-layers'") from None
    cfg = EngineConfig(policy=policy, kv_budget=kv_budget, window=window, sinks=sinks, recent=recent,
                       codebook_layers=cb, theta_k=theta_k, theta_v=theta_v, chunk=chunk, n_threads=threads,
                       flash_attn=flash_attn, max_tokens=max_tokens, n_cells=n_cells)
    cfg.validate()
    return cfg


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=True, path_type=Path))
@click.option("--ctx", "n_ctx", type=click.IntRange(min=64), default=None,
              help="Longest conversation in tokens (default: the model's trained context; "
                   "with --policy full, 4096 — the full cache is allocated up front).")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.7, show_default=True,
              help="Sampling temperature; 0 picks the most likely token.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Longest answer, in tokens.")
@click.option("--seed", type=int, default=None, help="Random seed for reproducible sampling.")
@click.option("--system", "system_prompt", default=None, help="System prompt for the conversation.")
@click.option("--prompt", default=None,
              help="Answer this one message, print the answer to stdout and exit (scriptable).")
@engine_options
def chat(model: Path | None, n_ctx: int | None, temperature: float, max_tokens: int, seed: int | None,
         system_prompt: str | None, prompt: str | None, **engine_kw: Any) -> None:
    """Chat with MODEL in the terminal (default model if none is given).

    The KV cache is compressed with --policy (default: spindle) to at most --kv-budget
    of the full cache's bytes once the conversation is long enough.

    \b
    Inside the chat:
      /help            list commands
      /reset           forget the conversation
      /system TEXT     set the system prompt (and reset)
      /stats           tokens seen, KV bytes now, full-cache bytes, reserve ratio
      /exit            leave (Ctrl-D works too); Ctrl-C stops the current answer
    """
    from spindle_local.chat_repl import ChatRepl, GenerationSettings
    from spindle_local.runtime.engine_chat import EngineChatModel
    from spindle_local.runtime.gguf_meta import read_meta
    from spindle_local.runtime.loader import load_llama_cpp
    from spindle_local.runtime.model_files import resolve_model

    path = resolve_model(model)
    meta = read_meta(path)
    if n_ctx and meta.n_ctx_train and n_ctx > meta.n_ctx_train:
        raise UsageError(f"--ctx {n_ctx} exceeds the model's trained context ({meta.n_ctx_train} tokens)")
    load_llama_cpp()
    full = engine_kw["policy"] == "full"
    cfg = engine_config(**engine_kw, max_tokens=n_ctx or (4096 if full else None),
                        n_cells=(n_ctx or 4096) if full else None)
    settings = GenerationSettings(temperature=temperature, max_tokens=max_tokens, seed=seed)
    chat_model = EngineChatModel(path, cfg)
    try:
        repl = ChatRepl(chat_model, settings, system_prompt=system_prompt)
        if prompt is not None:
            sys.exit(repl.one_shot(prompt))
        sys.exit(repl.run())
    finally:
        chat_model.close()


if __name__ == "__main__":
    main()
