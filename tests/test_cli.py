"""The command line as a user meets it: answers, geometry, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli


def _one_line_error(proc) -> str:
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert proc.returncode != 0, proc
    assert len(lines) == 1, f"expected one error line, got: {proc.stderr!r}"
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_one_shot_chat_answers(default_model: Path) -> None:
    proc = run_cli("chat", str(default_model), "--prompt", "What is the capital of France?",
                   "--temperature", "0", "--max-tokens", "24", "--seed", "1", "--ctx", "512")
    assert proc.returncode == 0, proc.stderr
    answer = proc.stdout.strip()
    assert answer, "empty answer"
    assert "Paris" in answer


def test_chat_keeps_conversation_from_stdin(default_model: Path) -> None:
    # Non-interactive stdin: each line is a message; /stats reports two turns.
    proc = run_cli("chat", str(default_model), "--temperature", "0", "--max-tokens", "8", "--ctx", "512",
                   input="Say hello.\nSay goodbye.\n/stats\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert "messages: 4" in proc.stderr
    assert len(proc.stdout.strip().splitlines()) >= 2


def test_info_reports_geometry(default_model: Path) -> None:
    proc = run_cli("info", str(default_model), "--json")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(proc.stdout)
    assert (meta["n_layer"], meta["n_head"], meta["n_head_kv"], meta["head_dim_k"]) == (30, 9, 3, 64)
    assert meta["kv_bytes_per_token_f16"] == 30 * 3 * (64 + 64) * 2


def test_missing_file(tmp_path: Path) -> None:
    line = _one_line_error(run_cli("chat", str(tmp_path / "nope.gguf"), "--prompt", "hi"))
    assert "not found" in line


def test_directory(tmp_path: Path) -> None:
    line = _one_line_error(run_cli("chat", str(tmp_path), "--prompt", "hi"))
    assert "directory" in line


def test_not_a_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_text("this is not a model\n")
    line = _one_line_error(run_cli("info", str(bogus)))
    assert "not a GGUF" in line


def test_truncated_gguf(tmp_path: Path, default_model: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with open(default_model, "rb") as f:
        cut.write_bytes(f.read(5000))
    line = _one_line_error(run_cli("chat", str(cut), "--prompt", "hi"))
    assert "truncated" in line


def test_truncated_tensor_data(tmp_path: Path, default_model: Path) -> None:
    # A complete header with the tensor data cut off: llama.cpp itself must refuse it.
    cut = tmp_path / "cut.gguf"
    with open(default_model, "rb") as f:
        cut.write_bytes(f.read(20_000_000))
    _one_line_error(run_cli("chat", str(cut), "--prompt", "hi"))


def test_runtime_library_missing(tmp_path: Path, default_model: Path) -> None:
    # Pointing llama-cpp-python at a folder without a library: one line saying how to fix it.
    line = _one_line_error(run_cli("chat", str(default_model), "--prompt", "hi",
                                   env={"LLAMA_CPP_LIB_PATH": str(tmp_path)}))
    assert "spindle-local setup" in line


def test_bad_option_exits_2(default_model: Path) -> None:
    proc = run_cli("chat", str(default_model), "--ctx", "-5", "--prompt", "hi")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_set_reaches_engine_and_stage_settings() -> None:
    import pytest

    from spindle_local.errors import UsageError
    from spindle_local.runtime.config import EngineConfig, apply_settings

    cfg = apply_settings(EngineConfig(), ["salient.share=0.2", "copy_spans.tokens=none", "keep_start=32",
                                          "lazy_plans=off", "codebooks=on", "codebooks.layers=2",
                                          "allocator=pyramid"])
    assert cfg.stages == {"salient.share": "0.2", "copy_spans.tokens": "none", "codebooks": "on",
                          "codebooks.layers": "2", "allocator": "pyramid"}
    assert cfg.keep_start == 32 and cfg.lazy_plans is False
    st = cfg.resolved_stages()
    assert st.salient.share == 0.2 and st.copy_spans.tokens is None and st.codebooks.layers == 2
    for bad, words in (("no_such_knob=1", "unknown setting 'no_such_knob'"), ("sinks", "KEY=VALUE"),
                       ("sinks=four", "expected int"), ("lookahead=maybe", "expected bool")):
        with pytest.raises(UsageError, match=words):
            apply_settings(EngineConfig(), [bad])
    # stage settings are checked against the policy's stages in one line
    with pytest.raises(UsageError, match="salient stage is off"):
        apply_settings(EngineConfig(policy="snapkv"), ["salient.share=0.1"]).validate()
    with pytest.raises(UsageError, match="expected float"):
        apply_settings(EngineConfig(), ["codebooks=on", "codebooks.theta_k=high"]).validate()
    with pytest.raises(UsageError, match="codebooks stage is off"):  # off in the default policy
        apply_settings(EngineConfig(), ["codebooks.theta_k=0.9"]).validate()


def test_option_table_matches_the_config_dataclass() -> None:
    """Every EngineConfig field is reachable (a flag or --set), and --help shows the dataclass defaults."""
    from dataclasses import fields

    from click.testing import CliRunner

    from spindle_local.cli import main
    from spindle_local.options import STAGE_FLAGS, flagged_fields
    from spindle_local.policy.stages import Codebooks
    from spindle_local.runtime.config import EngineConfig, apply_settings

    base = EngineConfig()
    for f in fields(EngineConfig):
        if f.name in ("stages", "rpc"):
            continue  # stage settings have their own keys; --rpc parses endpoints
        value = getattr(base, f.name)
        shown = {True: "on", False: "off", None: "none"}.get(value, value) if not isinstance(value, (int, float)) \
            or isinstance(value, bool) else value
        cfg = apply_settings(EngineConfig(), [f"{f.name}={shown}"])
        assert getattr(cfg, f.name) == value, f.name
    import click

    from spindle_local.cli import chat

    assert CliRunner().invoke(main, ["chat", "--help"]).exit_code == 0
    ctx = click.Context(chat)
    lines = {p.opts[0]: " ".join(p.get_help_record(ctx)) for p in chat.params if isinstance(p, click.Option)}
    for f in flagged_fields():
        key = f.metadata["flag"]
        value = getattr(base, f.name)
        want = {True: "on", False: "off", None: "none", (): "none"}.get(value, value) \
            if isinstance(value, (bool, type(None), tuple)) else value
        assert f"[default: {want}]" in lines[key], (flag, lines[key])
    cb = Codebooks()  # the stage's defaults (the default policy has it off)
    for key, (flag, _, default, _) in STAGE_FLAGS.items():
        assert default == getattr(cb, key.split(".")[1])
        assert f"[default: {default}]" in lines[flag]


def test_set_unknown_key_is_one_line_error(tmp_path) -> None:
    from click.testing import CliRunner

    from spindle_local.cli import main

    res = CliRunner().invoke(main, ["eval", "kld", "--set", "salient.bogus=1"])
    assert res.exit_code != 0
    text = res.output
    assert "unknown setting 'salient.bogus'" in text and "Traceback" not in text
    assert len([ln for ln in text.splitlines() if ln.strip()]) == 1



def test_set_errors_are_one_line() -> None:
    line = _one_line_error(run_cli("eval", "needle", "--set", "salient_sahre=0.2"))
    assert "unknown setting 'salient_sahre'" in line


def test_the_command_line_loads_no_web_framework() -> None:
    """`spindle-local --help` (and every command but serve) imports neither fastapi nor uvicorn."""
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from spindle_local.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0 and 'serve' in r.output; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette', 'uvicorn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_codebook_flag_turns_the_codebook_stage_on() -> None:
    from spindle_local.options import engine_config

    assert engine_config().resolved_stages().codebooks is None  # the default policy has none
    st = engine_config(codebooks__layers="2", theta_v=None).resolved_stages()
    assert st.codebooks.layers == 2
    assert engine_config(codebooks__theta_v=0.99).resolved_stages().codebooks.theta_v == 0.99
