"""Which architectures are compressed, run with the full cache only, or refused; the bundled Gemma 3."""

from __future__ import annotations

from pathlib import Path

import pytest

from spindle_local.errors import ModelError
from spindle_local.runtime.gguf_meta import read_meta
from spindle_local.runtime.support import model_support

from conftest import run_cli


def _write_header_only(path: Path, arch: str, **kv: int) -> Path:
    """A GGUF with metadata only (no tensors): enough for everything decided before loading."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gemma3() -> Path:
    from spindle_local.runtime.model_files import bundled_model_path

    return bundled_model_path("gemma3", quiet=True)


def test_support_classes(tmp_path: Path, default_model: Path, gemma3: Path) -> None:
    assert model_support(read_meta(default_model)).kind == "compressed"
    assert model_support(read_meta(gemma3)).kind == "compressed"  # its global layers
    g2 = read_meta(_write_header_only(tmp_path / "g2.gguf", "gemma2", block_count=2, embedding_length=64,
                                      **{"attention.head_count": 4, "attention.sliding_window": 64}))
    assert (model_support(g2).kind, model_support(g2).reason) == ("full", "sliding-window attention with soft-capping")
    other = read_meta(_write_header_only(tmp_path / "x.gguf", "starcoder2", block_count=2,
                                         embedding_length=64, **{"attention.head_count": 4}))
    assert model_support(other).kind == "full"  # not covered by the structural tests


def test_recurrent_model_is_refused_in_one_line(tmp_path: Path) -> None:
    path = _write_header_only(tmp_path / "m.gguf", "mamba", block_count=2, embedding_length=64)
    with pytest.raises(ModelError, match="mamba models are not supported: a recurrent"):
        read_meta(path)
    for args in (["info", str(path)], ["chat", str(path), "--prompt", "hi"]):
        r = run_cli(*args)
        assert r.returncode != 0
        assert "mamba models are not supported" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.model
def test_full_only_model_warns_or_refuses_in_one_line(tmp_path: Path) -> None:
    path = _write_header_only(tmp_path / "g2.gguf", "gemma2", block_count=2, embedding_length=64,
                              **{"attention.head_count": 4, "attention.sliding_window": 64})
    r = run_cli("info", str(path))
    assert r.returncode == 0 and "full cache only (sliding-window attention with soft-capping)" in r.stdout
    # a compression policy asked for explicitly: one line, before anything loads
    r = run_cli("chat", str(path), "--policy", "spindle", "--prompt", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: gemma2 models run with --policy full only for now (sliding-window attention with "
        "soft-capping: the compressed store does not handle it yet)"]
    # the default policy: one warning line, then the full cache (this file has no weights,
    # so loading it is the next one-line error)
    r = run_cli("chat", str(path), "--prompt", "hi")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(lines) == 2
    assert lines[0].startswith("warning: gemma2 runs with the full KV cache") and lines[1].startswith("error:")


@pytest.mark.model
def test_gemma3_info_and_chat(gemma3: Path) -> None:
    r = run_cli("info", "gemma3")
    assert r.returncode == 0, r.stderr
    assert "compressed (all policies)" in r.stdout
    r = run_cli("chat", "gemma3", "--prompt", "The capital of France is", "--temperature", "0",
                "--max-tokens", "8")
    assert r.returncode == 0 and "warning" not in r.stderr and "error" not in r.stderr, r.stderr
    assert r.stdout.strip()


@pytest.mark.model
def test_gemma3_without_template_gets_gemma_turns(gemma3: Path) -> None:
    """The bundled Gemma 3 GGUF carries no chat template: its turn markers select llama.cpp's
    built-in Gemma template, and the markers are control tokens in the rendered ids."""
    from spindle_local.runtime.chat_template import ChatTemplate
    from spindle_local.runtime.lowlevel import LlamaModel

    with LlamaModel(gemma3) as m:
        t = ChatTemplate(m)
        text = t.render([{"role": "user", "content": "Hi"}])
        assert text == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
        ids = t.tokens([{"role": "user", "content": "Hi"}])
        start = m.tokenize("<start_of_turn>", add_special=False, parse_special=True)
        assert len(start) == 1 and ids.count(start[0]) == 2
