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
from spindle_local.options import engine_config, engine_options
from spindle_local.runtime.build import BACKENDS

MODEL_ARG_HELP = "GGUF model file (default: SmolLM2-135M-Instruct, fetched on first use)."


def _fail(err: SpindleError) -> None:
    click.echo(f"error: {err}", err=True)
    sys.exit(err.exit_code)


class _Group(click.Group):
    """A group that turns SpindleError (and Ctrl-C outside a chat) into one clean line."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Click usage errors as one line (``error: ...``, exit 2) instead of three."""
        if kwargs.get("standalone_mode", True) is False:
            return super().main(*args, **kwargs)
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.format_message(), err=True)
            sys.exit(0)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(2)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)

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
@click.option("--backend", type=click.Choice(BACKENDS), default="cpu", show_default=True,
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
    from spindle_local.runtime.build import BuildConfig, ensure_runtime, ensure_stock_library, ensure_verified
    from spindle_local.runtime.model_files import default_model_path

    extra = tuple(os.environ.get("SPINDLE_CMAKE_ARGS", "").split())
    cfg = BuildConfig(backend=backend, extra_cmake_args=extra)
    report = ensure_runtime(cfg, force=force)
    click.echo(f"runtime: {report['key']} ({report['action']}, {report['seconds']:.1f} s)")
    if not no_model:
        click.echo(f"default model: {default_model_path()}")
    # After the model is cached, so that the smoke test also runs its quantized kernels.
    checked = ensure_verified(cfg)
    click.echo(f"runtime check: {checked['action']} on this CPU (instruction sets: {checked['tier']})")
    if stock:
        click.echo(f"stock library: {ensure_stock_library(BuildConfig(backend=backend, extra_cmake_args=extra))}")


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(model: Path | None, as_json: bool) -> None:
    """Show MODEL's attention geometry and the full-cache KV bytes per token."""
    from spindle_local.runtime.gguf_meta import read_meta
    from spindle_local.runtime.model_files import resolve_model

    from spindle_local.runtime.support import model_support

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
        ("full KV cache at trained ctx", _mib(meta.kv_bytes_per_token_f16 * meta.n_ctx_train)
         + (" if every layer held every token (window layers hold at most their window)"
            if meta.sliding_window else "")),
        ("KV compression", model_support(meta).describe()),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def conversation_setup(model: Path | None, n_ctx: int | None, engine_kw: dict[str, Any]):
    """Model path and engine settings for a conversation (chat, serve), checked before loading.

    ``--ctx`` is the longest conversation; with ``--policy full`` it is also the cache
    allocated up front (default 4096).
    """
    from spindle_local.runtime.gguf_meta import read_meta
    from spindle_local.runtime.model_files import resolve_model

    path = resolve_model(model)
    meta = read_meta(path)
    if n_ctx and meta.n_ctx_train and n_ctx > meta.n_ctx_train:
        raise UsageError(f"--ctx {n_ctx} exceeds the model's trained context ({meta.n_ctx_train} tokens)")
    engine_kw = supported_policy(meta, engine_kw)
    full = _policy(engine_kw) == "full"
    sized = full and engine_kw.get("kv_mem") is None  # --kv-mem sizes a full cache itself
    cfg = engine_config(**engine_kw, max_tokens=n_ctx or (4096 if full else None),
                        n_cells=(n_ctx or 4096) if sized else None)
    check_memory(cfg, meta)
    return path, cfg


def _policy(engine_kw: dict[str, Any]) -> str:
    """The policy the options name (the EngineConfig default when --policy is not given)."""
    from spindle_local.runtime.config import EngineConfig

    return engine_kw.get("policy") or EngineConfig.policy


def supported_policy(meta: Any, engine_kw: dict[str, Any]) -> dict[str, Any]:
    """``engine_kw`` for a model the store cannot compress: a full-cache-only model runs with ``--policy full`` (one warning line), unless a policy
    was asked for on the command line (then the one-line error says why not)."""
    from click.core import ParameterSource

    from spindle_local.runtime.support import model_support

    support = model_support(meta)  # read_meta has refused what cannot run at all
    if support.kind == "full" and _policy(engine_kw) != "full":
        ctx = click.get_current_context(silent=True)
        if ctx is not None and ctx.get_parameter_source("policy") == ParameterSource.COMMANDLINE:
            raise UsageError(support.full_only())
        click.echo(f"warning: {support.architecture} runs with the full KV cache ({support.reason}; "
                   "the compressed store does not handle it yet)", err=True)
        engine_kw = dict(engine_kw, policy="full")
    return engine_kw


def check_memory(cfg: Any, meta: Any) -> None:
    """Refuse an impossible --kv-mem or --kv-budget before anything loads (the message names the minimum)."""
    if cfg.policy == "full":
        return
    if cfg.kv_mem is None:
        cfg.check_budget(longest=cfg.max_tokens or meta.n_ctx_train or 1 << 30, geometry=meta.attention,
                         model_name=meta.name or Path(meta.path).name)
        return
    from spindle_local.runtime.memory import plan_model_memory

    plan_model_memory(meta, cfg.kv_mem, policy=cfg.policy, window=cfg.window, recent=cfg.recent, chunk=cfg.chunk,
                      max_tokens=cfg.max_tokens or meta.n_ctx_train or 4096)


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
@click.option("--file", "files", multiple=True, type=click.Path(path_type=Path), metavar="DOC",
              help="Read a UTF-8 text document into the conversation first (repeatable), with a progress line.")
@click.option("--resume", "resume_path", type=click.Path(path_type=Path), default=None, metavar="SESSION",
              help="Continue a conversation saved with /save (its engine settings are used; MODEL must be "
                   "the model it was saved with).")
@click.option("--verbose", "-v", is_flag=True,
              help="After each answer, a line with tokens/s and the prompt's reading speed (/set verbose on).")
@engine_options
@click.pass_context
def chat(click_ctx: click.Context, model: Path | None, n_ctx: int | None, temperature: float, max_tokens: int,
         seed: int | None, system_prompt: str | None, prompt: str | None, files: tuple[Path, ...],
         resume_path: Path | None, verbose: bool, **engine_kw: Any) -> None:
    """Chat with MODEL in the terminal (default model if none is given).

    The KV cache is compressed with --policy (default: spindle) to at most --kv-budget
    of the full cache's bytes once the conversation is long enough, or to at most
    --kv-mem bytes of KV memory (e.g. --kv-mem 64MiB) however long it gets: documents
    far longer than that memory are read in chunks, compressing between chunks.

    \b
    Inside the chat:
      /help            list commands
      /reset           forget the conversation
      /system TEXT     set the system prompt (and reset)
      /stats           tokens seen, KV bytes now, full-cache bytes, reserve ratio
      /read FILE       read a text document into the conversation
      /save FILE       save the conversation with its compressed KV cache
      /set verbose on  tokens/s after each answer
      /exit, /bye      leave (Ctrl-D works too); Ctrl-C stops the current answer
    A line ending in \\ continues on the next one; text between two \"\"\" lines is one message.
    """
    from spindle_local.chat_repl import ChatRepl, GenerationSettings, load_document
    from spindle_local.runtime.loader import load_llama_cpp

    saved = None
    if resume_path is not None:
        from spindle_local.runtime.model_files import resolve_model
        from spindle_local.runtime.session import read_session

        saved = read_session(resume_path)  # checked before anything loads
        path = resolve_model(model)
        saved.check_model(path)
        cfg = saved.config()
        system_prompt = saved.system_prompt
        _warn_resume_overrides(click_ctx, cfg, n_ctx=n_ctx, threads=engine_kw.get("threads"))
        # where layers run is this command's choice, not the session's
        placed = engine_config(**engine_kw)
        cfg.rpc, cfg.gpu_layers = placed.rpc, placed.gpu_layers
    else:
        path, cfg = conversation_setup(model, n_ctx, engine_kw)
    for f in files:
        load_document(f)  # a missing or unreadable document fails before the model loads
    load_llama_cpp()
    from spindle_local.runtime.engine_chat import EngineChatModel
    settings = GenerationSettings(temperature=temperature, max_tokens=max_tokens, seed=seed, verbose=verbose)
    chat_model = EngineChatModel(path, cfg)
    try:
        repl = ChatRepl(chat_model, settings, system_prompt=system_prompt)
        if prompt is None or verbose:
            repl.show_banner()
        if saved is not None:
            chat_model.resume(saved)
            repl.messages = saved.messages
            repl._notice(f"[resumed {resume_path.name}: {len(saved.messages)} messages, "
                         f"{chat_model.engine.n_past:,} tokens]")
        for f in files:
            repl.read_document(f)
        if prompt is not None:
            sys.exit(repl.one_shot(prompt))
        sys.exit(repl.run())
    finally:
        chat_model.close()


def _warn_resume_overrides(click_ctx: click.Context, cfg: Any, *, n_ctx: int | None, threads: int | None) -> None:
    """With --resume, say in one line which explicitly given options the session's settings replace.

    The saved KV cache was built with the session's policy, budget, window, chunk and
    context; only --threads, --rpc and --gpu-layers (how and where, not what is computed) are honoured.
    """
    from click.core import ParameterSource

    if threads is not None:
        cfg.n_threads = threads
    given = [p for p in click_ctx.command.params
             if isinstance(p, click.Option) and p.name in _SESSION_SETTINGS
             and click_ctx.get_parameter_source(p.name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)]
    if not given:
        return
    names = ", ".join(p.opts[0] for p in given)
    from spindle_local.runtime.memory import format_size

    budget = f"--kv-mem {format_size(cfg.kv_mem)}" if cfg.kv_mem is not None else f"--kv-budget {cfg.kv_budget:g}"
    ctx = f"--ctx {cfg.max_tokens}" if cfg.max_tokens else "the trained context"
    click.echo(f"warning: {names} ignored: a resumed session keeps the settings its KV cache was built with "
               f"(--policy {cfg.policy}, {budget}, {ctx})", err=True)


#: chat options a resumed session's own settings replace (see _warn_resume_overrides).
_SESSION_SETTINGS = {"n_ctx", "policy", "kv_budget", "kv_mem", "window", "sinks", "recent", "codebooks__layers",
                     "codebooks__theta_k", "codebooks__theta_v", "chunk", "lookahead", "flash_attn", "settings"}


# -- evaluation --------------------------------------------------------------------------------


def _csv_numbers(kind: type, name: str):
    def convert(ctx: click.Context, param: click.Parameter, value: str):
        try:
            items = [kind(x) for x in value.split(",") if x.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
        if not items:
            raise click.BadParameter("empty list")
        return items
    return convert


def _parse_cells(ctx: click.Context, param: click.Parameter, value: str | None) -> list[tuple[int, float]] | None:
    """``--cells 3500:0.1,6000:0.5``: (length, depth) pairs."""
    if value is None:
        return None
    cells = []
    for item in (x.strip() for x in value.split(",")):
        if not item:
            continue
        length, _, depth = item.partition(":")
        try:
            cell = (int(length), float(depth))
        except ValueError:
            raise click.BadParameter(f"expected LENGTH:DEPTH pairs such as 3500:0.1, got {item!r}") from None
        if cell[0] < 1 or not 0.0 <= cell[1] <= 1.0:
            raise click.BadParameter(f"{item!r}: the length must be positive and the depth in [0, 1]")
        cells.append(cell)
    if not cells:
        raise click.BadParameter("empty list")
    return cells


def _given(name: str) -> bool:
    """Whether the option ``name`` of the running command was given (not its default)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _output_options(f):
    """--json and --out, shared by the evaluation commands."""
    f = click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     metavar="FILE.jsonl",
                     help="Append one JSON line per configuration (result and provenance); its folder is made.")(f)
    return click.option("--json", "as_json", is_flag=True,
                        help="Print JSON: one document for one configuration, one line per configuration "
                             "for a grid.")(f)


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    for k, v in result.items():
        if k == "provenance":
            src = v["source"]
            commit = (src["commit"] or "unknown")[:12] + (" (uncommitted changes)" if src["dirty"] else "")
            v = f"{commit}, patches {(v['patch_hash'] or 'unknown')[:12]}, {v['date']}"
        elif isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, list):
            v = f"[{len(v)} items]"
        click.echo(f"{k:<28} {v}")


class _Report:
    """Where an evaluation's rows go: stdout (text or JSON) and, with --out, a JSON-lines file."""

    def __init__(self, cfgs: list, as_json: bool, out: Path | None, show=None) -> None:
        from spindle_local.eval.grid import check_out, labels

        self.labels = dict(zip(map(id, cfgs), labels(cfgs)))
        self.many, self.as_json, self.out = len(cfgs) > 1, as_json, out
        self.show = show or (lambda row: _emit(row, False))
        if out is not None:
            check_out(out)

    def add(self, result: dict, cfg: Any) -> None:
        from spindle_local.eval.grid import append_row, result_row

        row = result_row(result, cfg, self.labels[id(cfg)])
        if self.out is not None:
            append_row(self.out, row)
        if self.as_json:
            click.echo(json.dumps(row, default=str) if self.many else json.dumps(row, indent=2, default=str))
            return
        if self.many:
            click.echo(f"== {row['label']}")
        self.show(row)
        if self.many:
            click.echo("")


def _progress(label: str, steps: int):
    """A progress bar over a whole grid; ``bar.step()`` gives each run its ``progress(done, total)``."""
    bar = click.progressbar(length=steps, label=label, file=sys.stderr)

    def step():
        last = {"n": 0}

        def progress(done: int, total: int) -> None:
            bar.update(done - last["n"])
            last["n"] = done
        return progress

    bar.step = step  # type: ignore[attr-defined]
    return bar


def _eval_model(model: Path | None, meta_check: bool = True):
    from spindle_local.runtime.gguf_meta import read_meta
    from spindle_local.runtime.loader import load_llama_cpp
    from spindle_local.runtime.model_files import resolve_model

    path = resolve_model(model, quiet=True)
    meta = read_meta(path)
    load_llama_cpp()
    return path, meta


@main.group(name="eval", cls=_Group)
def eval_group() -> None:
    """Measure fidelity, retrieval and speed of a policy against the full cache.

    \b
    Lists make a grid, run in one process (model loaded once, the full cache's results
    computed once): --policy snapkv,spindle --kv-budget 0.25,0.15 --set salient.share=0,0.25.
    """


@eval_group.command("kld")
@click.argument("model", required=False, type=click.Path(dir_okay=True, path_type=Path))
@click.option("--text", type=click.Path(path_type=Path), default=None,
              help="UTF-8 text to read (default: Python's pydoc topics).")
@click.option("--context", type=click.IntRange(min=16), default=4000, show_default=True,
              help="Tokens read (and compressed) before scoring.")
@click.option("--continuation", type=click.IntRange(min=1), default=256, show_default=True,
              help="Tokens scored against the full cache.")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True,
              help="Tokens of the text skipped before the context (another passage of the same text).")
@click.option("--cache-type", type=click.Choice(["f16", "q8_0", "q4_0"]), default="f16", show_default=True,
              help="Regular-cache type; q8_0/q4_0 measure llama.cpp's own KV quantization (policy full).")
@click.option("--base", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE.npz",
              help="The full cache's logits: computed and saved to FILE when it does not exist, read from it "
                   "when it does (refused unless model, text, --context, --continuation and --offset match).")
@_output_options
@engine_options(grid=True)
def eval_kld(model: Path | None, text: Path | None, context: int, continuation: int, offset: int, cache_type: str,
             base: Path | None, as_json: bool, out: Path | None, **engine_kw: Any) -> None:
    """Next-token KL divergence, top-1 agreement and perplexity vs the full cache."""
    from spindle_local.eval.grid import SharedModels
    from spindle_local.eval.kld import reference, run_kld
    from spindle_local.eval.texts import load_text
    from spindle_local.options import engine_grid

    cfgs = engine_grid(**engine_kw)
    if cache_type != "f16":
        if len(cfgs) > 1:
            raise UsageError(f"--cache-type {cache_type} measures llama.cpp's own cache with the full policy: "
                             "give one configuration")
        cfgs[0].policy, cfgs[0].stages, cfgs[0].cache_type = "full", {}, cache_type
    report = _Report(cfgs, as_json, out)
    path, meta = _eval_model(model)
    if meta.n_ctx_train and context + continuation > meta.n_ctx_train:
        raise UsageError(f"--context + --continuation = {context + continuation} exceeds the model's trained "
                         f"context ({meta.n_ctx_train})")
    words = load_text(text)
    with SharedModels(str(path)) as models:
        for cfg in cfgs:
            loaded, memo = models.get(cfg), models.memo(cfg)
            if "kld" not in memo:
                memo["kld"] = reference(str(path), loaded, text=words, context=context, continuation=continuation,
                                        engine_config=cfg, offset=offset, base=base)
            report.add(run_kld(str(path), text=words, context=context, continuation=continuation, engine_config=cfg,
                               cache_type=cache_type, offset=offset, model=loaded, ref=memo["kld"], base=base), cfg)


@eval_group.command("needle")
@click.argument("model", required=False, type=click.Path(dir_okay=True, path_type=Path))
@click.option("--lengths", default="1000,4000", show_default=True, callback=_csv_numbers(int, "lengths"),
              help="Prompt lengths in tokens, comma-separated.")
@click.option("--depths", default="0.1,0.5,0.9", show_default=True, callback=_csv_numbers(float, "depths"),
              help="Needle depths in [0, 1], comma-separated.")
@click.option("--cells", default=None, callback=_parse_cells, metavar="LENGTH:DEPTH,...",
              help="Run these (length, depth) cells instead of --lengths × --depths, e.g. 3500:0.1,6000:0.1. "
                   "Keys are drawn cell after cell in the order given, as for the product.")
@click.option("--samples", type=click.IntRange(min=1), default=4, show_default=True, help="Prompts per cell.")
@click.option("--haystack", type=click.Path(path_type=Path), default=None,
              help="Filler text (default: Python's pydoc topics).")
@click.option("--needle", "needle_tmpl", default=None, help="Needle template; {key} is the random key.")
@click.option("--question", default=None, help="Question at the end of the prompt.")
@click.option("--protocol", type=click.Choice(["in-prompt", "later", "multi"]), default="in-prompt",
              show_default=True,
              help="in-prompt: haystack and question are one prompt. later: the same tokens, the haystack read "
                   "(and compressed) as one prompt, then the question as a second one, as chat --file does. "
                   "multi: one named needle per depth in one document, asked in turn in one conversation "
                   "without re-reading (--needle/--question must then contain {name}).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the keys.")
@_output_options
@engine_options(grid=True)
def eval_needle(model: Path | None, lengths: list[int], depths: list[float], cells: list[tuple[int, float]] | None,
                samples: int, haystack: Path | None, needle_tmpl: str | None, question: str | None, protocol: str,
                seed: int, as_json: bool, out: Path | None, **engine_kw: Any) -> None:
    """Pass-key retrieval in completion form, compressed vs full cache on the same prompts."""
    from spindle_local.eval.grid import SharedModels
    from spindle_local.eval.needle import run_needle
    from spindle_local.eval.texts import load_text
    from spindle_local.options import engine_grid

    if cells is not None:
        if _given("lengths") or _given("depths"):
            raise UsageError("give either --cells or --lengths/--depths, not both")
        if protocol == "multi":
            raise UsageError("--cells is for the in-prompt and later protocols (multi puts every depth in one "
                             "document: use --lengths and --depths)")
        lengths, depths = sorted({n for n, _ in cells}), sorted({d for _, d in cells})
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise UsageError("--depths must lie in [0, 1]")
    if needle_tmpl is not None and "{key}" not in needle_tmpl:
        raise UsageError("--needle must contain {key}")
    if protocol == "multi" and any(t is not None and "{name}" not in t for t in (needle_tmpl, question)):
        raise UsageError("--protocol multi needs {name} in --needle and --question (to tell the needles apart)")
    cfgs = engine_grid(**engine_kw)
    report = _Report(cfgs, as_json, out)
    path, meta = _eval_model(model)
    if meta.n_ctx_train and max(lengths) > meta.n_ctx_train:
        raise UsageError(f"--lengths {max(lengths)} exceeds the model's trained context ({meta.n_ctx_train})")
    text = load_text(haystack)
    per_cfg = samples * (len(lengths) if protocol == "multi" else len(cells) if cells else len(lengths) * len(depths))
    with SharedModels(str(path)) as models:
        for cfg in cfgs:
            with _progress("needle", per_cfg) as bar:
                try:
                    result = run_needle(str(path), lengths=lengths, depths=depths, cells=cells, samples=samples,
                                        seed=seed, engine_config=cfg, haystack=text, needle=needle_tmpl,
                                        question=question, protocol=protocol, progress=bar.step(),
                                        full_results=models.memo(cfg).setdefault("needle", {}),
                                        model=models.get(cfg))
                except ValueError as e:
                    raise UsageError(str(e)) from None
            report.add({"model": str(path), **result}, cfg)


@eval_group.command("ruler")
@click.argument("model", required=False, type=click.Path(dir_okay=True, path_type=Path))
@click.option("--tasks", default="niah_single,niah_multikey,niah_multivalue,vt,cwe", show_default=True,
              help="Tasks, comma-separated: niah_single, niah_multikey, niah_multivalue, vt (variable "
                   "tracking), cwe (common-words extraction).")
@click.option("--lengths", default="1000,4000", show_default=True, callback=_csv_numbers(int, "lengths"),
              help="Prompt lengths in tokens, comma-separated.")
@click.option("--samples", type=click.IntRange(min=1), default=4, show_default=True,
              help="Prompts per task and length.")
@click.option("--protocol", type=click.Choice(["in-prompt", "later", "both"]), default="both", show_default=True,
              help="in-prompt: document and question are one prompt; later: the document is read (and "
                   "compressed) first, the question is a second prompt; both: each, on the same prompts.")
@click.option("--haystack", type=click.Path(path_type=Path), default=None,
              help="UTF-8 filler text (default: Python's pydoc topics).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the prompts.")
@_output_options
@engine_options(grid=True)
def eval_ruler(model: Path | None, tasks: str, lengths: list[int], samples: int, protocol: str,
               haystack: Path | None, seed: int, as_json: bool, out: Path | None, **engine_kw: Any) -> None:
    """RULER-style tasks generated locally, compressed vs full cache on the same prompts."""
    from spindle_local.eval.grid import SharedModels
    from spindle_local.eval.ruler import PROTOCOLS, TASKS, run_ruler
    from spindle_local.eval.texts import load_text
    from spindle_local.options import engine_grid

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    bad = [t for t in names if t not in TASKS]
    if bad or not names:
        raise UsageError(f"unknown task {bad[0] if bad else ''!r} for --tasks; choose from {', '.join(TASKS)}")
    protocols = list(PROTOCOLS) if protocol == "both" else [protocol]
    cfgs = engine_grid(**engine_kw)
    text = load_text(haystack)
    report = _Report(cfgs, as_json, out, show=_show_ruler)
    path, meta = _eval_model(model)
    if meta.n_ctx_train and max(lengths) + 256 > meta.n_ctx_train:
        raise UsageError(f"--lengths {max(lengths)} (plus the answer) exceeds the model's trained context "
                         f"({meta.n_ctx_train})")
    with SharedModels(str(path)) as models:
        for cfg in cfgs:
            with _progress("ruler", len(names) * len(lengths) * samples * len(protocols)) as bar:
                try:
                    result = run_ruler(str(path), tasks=names, lengths=lengths, samples=samples, seed=seed,
                                       engine_config=cfg, haystack=text, protocols=protocols, progress=bar.step(),
                                       full_results=models.memo(cfg).setdefault("ruler", {}), model=models.get(cfg))
                except ValueError as e:
                    raise UsageError(str(e)) from None
            report.add({"model": str(path), "haystack": str(haystack) if haystack else "pydoc_data", **result}, cfg)


def _show_ruler(result: dict) -> None:
    click.echo(f"policy {result['policy']} @ {result['kv_budget']}, {result['samples']} samples per cell, "
               f"haystack {result['haystack']}")
    click.echo(f"{'task':<16} {'protocol':<10} {'score':>6} {'full':>6} {'delta':>7} {'relative':>8} {'d logp':>7}")
    for task, by in result["summary"].items():
        for proto, s in by.items():
            d = s["logprob_delta"]
            click.echo(f"{task:<16} {proto:<10} {s['score']:6.3f} {s['score_full']:6.3f} {s['delta']:+7.1f} "
                       f"{s['relative']:8.3f} {'-' if d is None else f'{d:+.2f}':>7}")


@eval_group.command("speed")
@click.argument("model", required=False, type=click.Path(dir_okay=True, path_type=Path))
@click.option("--context", type=click.IntRange(min=16), default=6000, show_default=True,
              help="Prompt tokens.")
@click.option("--gen", type=click.IntRange(min=0), default=64, show_default=True, help="Tokens generated.")
@click.option("--reps", type=click.IntRange(min=1), default=3, show_default=True,
              help="Rounds, each measuring every configuration once (medians are reported).")
@click.option("--text", type=click.Path(path_type=Path), default=None, help="Prompt text (default: pydoc topics).")
@_output_options
@engine_options(grid=True)
def eval_speed(model: Path | None, context: int, gen: int, reps: int, text: Path | None, as_json: bool,
               out: Path | None, **engine_kw: Any) -> None:
    """Prefill/decode speed and peak RSS vs stock llama.cpp, same prompt, same run.

    Each measurement runs in a process of its own. The repetitions run in rounds: a
    round measures every configuration of a grid once, each after stock llama.cpp (once
    a round per threads and flash-attention setting, shared by the rows with that
    setting: ``stock_reused``), so a machine's drift moves every row alike.
    """
    from dataclasses import asdict

    from spindle_local.eval.speed import measure_speed
    from spindle_local.options import engine_grid

    cfgs = engine_grid(**engine_kw)
    if text is not None and not Path(text).is_file():
        raise UsageError(f"text file not found: {text}")
    report = _Report(cfgs, as_json, out)
    path, meta = _eval_model(model)
    if meta.n_ctx_train and context + gen > meta.n_ctx_train:
        raise UsageError(f"--context + --gen exceeds the model's trained context ({meta.n_ctx_train})")
    engines = [asdict(c) for c in cfgs]
    n_stock = len({(e["n_threads"], e["flash_attn"]) for e in engines})
    with click.progressbar(length=reps * (len(engines) + n_stock), label="speed", file=sys.stderr) as bar:
        results = measure_speed(model=str(path), context=context, gen=gen, engines=engines, reps=reps,
                                text=str(text) if text else None, progress=lambda *_: bar.update(1))
    for cfg, result in zip(cfgs, results):
        report.add({"model": str(path), "policy": cfg.policy, "kv_budget": cfg.kv_budget, **result}, cfg)



@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=True, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for report.md, results.json and the plots.")
@click.option("--text", type=click.Path(path_type=Path), default=None, help="Text for KLD and haystacks.")
@click.option("--policies", default=",".join(("streaming", "snapkv", "pyramidkv", "spindle")), show_default=True,
              help="Policies to compare (comma-separated).")
@click.option("--budgets", default="0.4,0.25,0.15", show_default=True, callback=_csv_numbers(float, "budgets"),
              help="KV budgets (comma-separated).")
@click.option("--lengths", default="1000,3000,6000", show_default=True, callback=_csv_numbers(int, "lengths"),
              help="Needle prompt lengths.")
@click.option("--depths", default="0.1,0.5,0.9", show_default=True, callback=_csv_numbers(float, "depths"),
              help="Needle depths.")
@click.option("--samples", type=click.IntRange(min=1), default=2, show_default=True, help="Needle prompts per cell.")
@click.option("--protocols", default="in-prompt,later", show_default=True,
              help="Pass-key protocols, reported side by side: in-prompt, later, multi (comma-separated).")
@click.option("--kld-context", type=click.IntRange(min=16), default=4000, show_default=True)
@click.option("--kld-continuation", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: the physical cores this process may use).")
def bench(model: Path | None, out_dir: Path, text: Path | None, policies: str, budgets: list[float],
          lengths: list[int], depths: list[float], samples: int, protocols: str, kld_context: int,
          kld_continuation: int, seed: int, threads: int | None) -> None:
    """Run the policy × budget grid (plus full f16/q8_0/q4_0) and write a report with plots."""
    from spindle_local.eval.bench import BenchGrid, run_bench
    from spindle_local.eval.texts import load_text

    POLICIES = ("full", "streaming", "snapkv", "pyramidkv", "spindle")
    names = tuple(p.strip() for p in policies.split(",") if p.strip())
    bad = [p for p in names if p not in POLICIES or p == "full"]
    if bad:
        raise UsageError(f"unknown policy {bad[0]!r} for --policies (full always runs as the baseline)")
    if any(not 0 < b <= 1 for b in budgets):
        raise UsageError("--budgets must lie in (0, 1]")
    protos = tuple(p.strip() for p in protocols.split(",") if p.strip())
    bad = [p for p in protos if p not in ("in-prompt", "later", "multi")]
    if bad or not protos:
        raise UsageError(f"unknown protocol {bad[0] if bad else ''!r} for --protocols (in-prompt, later, multi)")
    grid = BenchGrid(policies=names, budgets=tuple(budgets), kld_context=kld_context,
                     kld_continuation=kld_continuation, lengths=tuple(lengths), depths=tuple(depths),
                     samples=samples, seed=seed, protocols=protos)
    path, meta = _eval_model(model)
    if meta.n_ctx_train and max(max(lengths), kld_context + kld_continuation) > meta.n_ctx_train:
        raise UsageError(f"the grid exceeds the model's trained context ({meta.n_ctx_train})")
    from spindle_local.runtime.config import EngineConfig
    steps = grid.configs()
    n_steps = sum(1 + len(protos) if ct == "f16" else 1 for _, _, ct in steps)
    with click.progressbar(length=n_steps, label="bench", file=sys.stderr,
                           item_show_func=lambda s: s or "") as bar:
        def progress(what: str) -> None:
            bar.update(1, what)

        run_bench(str(path), out_dir, grid, EngineConfig(n_threads=threads), load_text(text), progress=progress)
    click.echo(f"report: {out_dir / 'report.md'}")


@main.command("policies")
@click.argument("name", required=False)
def policies(name: str | None) -> None:
    """List the policies (presets of stages) and every setting --set accepts.

    With NAME, show that policy's resolved stage settings.
    """
    from dataclasses import fields

    from spindle_local.policy.presets import PRESETS, preset, setting_keys
    from spindle_local.runtime.config import EngineConfig

    if name is not None:
        if name == "full":
            click.echo("full: keeps every token (the reference run); no stages")
            return
        try:
            st = preset(name)
        except ValueError as e:
            raise UsageError(str(e)) from None
        for key, value in st.settings().items():
            click.echo(f"{key:<24} {value}")
        return
    click.echo("policies: full, " + ", ".join(PRESETS) + "   (spindle-local policies NAME shows one)")
    click.echo("\nstage settings (--set stage=kind, --set stage.field=value):")
    for key, text in setting_keys().items():
        click.echo(f"  {key:<24} {text}")
    click.echo("\nengine settings (--set name=value):")
    for f in fields(EngineConfig):
        if f.name != "stages":
            flag = f.metadata.get("flag")
            click.echo(f"  {f.name:<24} {f.metadata.get('help', '')}" + (f"  ({flag})" if flag else ""))


@main.command("rpc-server")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback exposes this machine to the network.")
@click.option("--port", type=click.IntRange(1, 65535), default=50052, show_default=True, help="TCP port.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: the physical cores this process may use).")
def rpc_server(host: str, port: int, threads: int | None) -> None:
    """Serve this machine's CPU to other spindle-local processes over ggml's RPC protocol.

    Clients place layers here with --rpc HOST:PORT. The protocol has no authentication:
    bind beyond loopback only on a network you trust.
    """
    from spindle_local.runtime.devices import default_threads
    from spindle_local.runtime.rpc import is_loopback, serve as rpc_serve

    if not is_loopback(host):
        click.echo(f"warning: the RPC server on {host}:{port} accepts anyone who reaches it "
                   "(ggml's RPC protocol has no authentication)", err=True)
    click.echo(f"RPC server on {host}:{port}; Ctrl-C stops it", err=True)
    rpc_serve(host, port, threads or default_threads())


@main.command("serve")
@click.argument("model", required=False, type=click.Path(dir_okay=True, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="TCP port.")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=64), default=None,
              help="Longest sequence in tokens (default: the model's trained context; "
                   "with --policy full, 4096 — the full cache is allocated up front).")
@click.option("--max-tokens", "default_max_tokens", type=click.IntRange(min=1), default=512,
              show_default=True, help="Completion length when a request does not set max_tokens.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", show_default=True, help="Server log level.")
@engine_options
def serve(model: Path | None, host: str, port: int, n_ctx: int | None, default_max_tokens: int,
          log_level: str, **engine_kw: Any) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, ...).

    One model, one conversation at a time: requests queue in order, and a request
    that extends the previous conversation only prefills its new part. Any model
    name in a request is served by this model (responses name it). Ctrl-C or SIGTERM
    stops the server within seconds; requests still running get a 503.
    """
    path, cfg = conversation_setup(model, n_ctx, engine_kw)
    from spindle_local.server import run_server  # the web framework loads only here

    run_server(path, cfg, host=host, port=port, default_max_tokens=default_max_tokens, log_level=log_level)


if __name__ == "__main__":
    main()
