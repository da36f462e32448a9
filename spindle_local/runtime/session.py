"""Saved conversations: the compressed KV state on disk, to resume without re-reading.

A session file holds everything the engine needs to continue exactly where it was: the
tokens, the regular cache (llama.cpp's own per-sequence state), every layer's compressed
store (positions, visibility masks, raw rows or codebooks), the window queries the next
compression will score with, the last logits, the engine settings and counters, the chat
messages, and the model's identity.

Layout (little-endian)::

    b"SPNDLSES"  u32 format version  u64 header length  header (UTF-8 JSON)
    u64 payload length  payload (numpy .npz, no pickles)  sha256 of everything before

Reading checks magic, version, lengths and the checksum before anything is restored,
so a truncated, corrupted or foreign file is refused with one line and the running
engine is not touched. Writing goes to a temporary file in the same folder that is
fsynced and renamed over the target: an interrupted save leaves the previous file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from spindle_local.errors import SpindleError
from spindle_local.runtime.config import EngineConfig

MAGIC = b"SPNDLSES"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<8sIQ")
_LEN = struct.Struct("<Q")
_DIGEST = 32
_FINGERPRINT_SPAN = 1 << 20


#: settings older session files keep at the top level, and the stage setting each now is.
_FLAT_SETTINGS = {"codebook_layers": "codebooks.layers", "theta_k": "codebooks.theta_k", "theta_v": "codebooks.theta_v"}
_FLAT_DEFAULTS = {"codebook_layers": "auto", "theta_k": 0.98, "theta_v": 0.95}


class SessionError(SpindleError):
    """A session file that cannot be used (one line, for the user); bad input like a missing one."""

    exit_code = 2


def model_identity(path: str | Path) -> dict[str, Any]:
    """Name, size and a content fingerprint (sha256 of size, first and last MiB) of a GGUF file.

    Hashing a multi-GiB model on every save would take seconds; its header (metadata,
    tensor table) and its last tensor's bytes differ between any two models we know of.
    """
    from spindle_local.runtime.gguf_meta import read_meta

    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(_FINGERPRINT_SPAN))
        f.seek(max(0, size - _FINGERPRINT_SPAN))
        h.update(f.read(_FINGERPRINT_SPAN))
    meta = read_meta(p)
    return {"file": p.name, "name": meta.name, "architecture": meta.architecture, "size": size,
            "fingerprint": h.hexdigest()}


@dataclass
class Session:
    """A session file's contents, checked and decoded (nothing restored yet)."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def messages(self) -> list[dict[str, str]]:
        return list(self.header.get("messages", []))

    @property
    def system_prompt(self) -> str | None:
        return self.header.get("system_prompt")

    @property
    def model(self) -> dict[str, Any]:
        return self.header["model"]

    def config(self) -> EngineConfig:
        saved = dict(self.header["config"])
        # files written before policies were stage compositions kept the codebook settings flat
        stages = dict(saved.get("stages") or {})
        for old, new in _FLAT_SETTINGS.items():
            if old in saved and saved[old] != _FLAT_DEFAULTS[old]:
                stages.setdefault(new, saved[old])
        if saved.get("policy", "spindle") == "spindle" and any(k in saved for k in _FLAT_SETTINGS):
            stages.setdefault("codebooks", "on")  # the spindle preset had codebook layers then
        known = {f.name for f in fields(EngineConfig)} - {"rpc", "gpu_layers"}  # placement: the command's
        cfg = EngineConfig(**{k: v for k, v in saved.items() if k in known and k != "stages"}, stages=stages)
        cfg.validate()
        return cfg

    def check_model(self, path: str | Path) -> None:
        """Refuse to resume on another model than the one the session was saved with."""
        ident = model_identity(path)
        saved = self.model
        if ident["fingerprint"] != saved.get("fingerprint"):
            raise SessionError(f"the session was saved with model {saved.get('file')} ({saved.get('name')}); "
                               f"{ident['file']} is a different model: pass the session's model to resume")


# -- writing -------------------------------------------------------------------------------------


def write_atomic(path: str | Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` through a temporary file and a rename (all or nothing)."""
    target = Path(path)
    if target.is_dir():
        raise SessionError(f"{target} is a directory")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise SessionError(f"cannot save to {target}: folder {folder} does not exist")
    _remove_stale_temporaries(folder, target.name)
    tmp = folder / f".{target.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _remove_stale_temporaries(folder: Path, name: str) -> None:
    """Delete temporaries of ``name`` left by a save whose process died (kill -9, power loss)."""
    for leftover in folder.glob(f".{name}.tmp-*"):
        try:
            pid = int(leftover.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            try:
                leftover.unlink()
            except OSError:
                pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def encode(header: dict[str, Any], arrays: dict[str, np.ndarray], *, version: int = FORMAT_VERSION) -> list[bytes]:
    """The file's bytes, in pieces (``version`` other than the current one only for tests)."""
    head = json.dumps(header, separators=(",", ":")).encode()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    payload = buf.getvalue()
    pieces = [_HEAD.pack(MAGIC, version, len(head)), head, _LEN.pack(len(payload)), payload]
    h = hashlib.sha256()
    for p in pieces:
        h.update(p)
    pieces.append(h.digest())
    return pieces


def decode(data: bytes, *, name: str = "the session file") -> Session:
    """Check and decode a session file's bytes (magic, version, lengths, checksum)."""
    if len(data) < _HEAD.size or data[:len(MAGIC)] != MAGIC:
        raise SessionError(f"{name} is not a spindle-local session file")
    _, version, n_head = _HEAD.unpack_from(data)
    if version != FORMAT_VERSION:
        raise SessionError(f"{name} has session format version {version}; this spindle-local reads "
                           f"version {FORMAT_VERSION}")
    at = _HEAD.size + n_head
    if at + _LEN.size > len(data):
        raise SessionError(f"{name} is truncated")
    (n_payload,) = _LEN.unpack_from(data, at)
    end = at + _LEN.size + n_payload
    if end + _DIGEST > len(data):
        raise SessionError(f"{name} is truncated ({len(data)} bytes, {end + _DIGEST} expected)")
    if end + _DIGEST < len(data):
        raise SessionError(f"{name} has {len(data) - end - _DIGEST} unexpected trailing bytes")
    if hashlib.sha256(data[:end]).digest() != data[end:end + _DIGEST]:
        raise SessionError(f"{name} is corrupted (checksum mismatch)")
    try:
        header = json.loads(data[_HEAD.size:at].decode())
        with np.load(io.BytesIO(data[at + _LEN.size:end]), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise SessionError(f"{name} could not be decoded: {e}") from None
    return Session(header=header, arrays=arrays)


def read_session(path: str | Path) -> Session:
    from spindle_local.paths import read_user_file

    p = Path(path)
    data = read_user_file(p, "session file")
    return decode(data, name=str(p))


def capture(engine, *, messages: list[dict[str, str]], system_prompt: str | None,
            model_path: str | Path | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Header and arrays describing ``engine``'s state and the conversation.

    ``model_path`` None leaves the model's identity out: an in-memory snapshot that the
    same engine restores after an interrupted read (``Engine.transaction``).
    """
    from spindle_local import __version__

    info, arrays = engine.state_dict()
    header = {
        "format": FORMAT_VERSION,
        "spindle_local": __version__,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model_identity(model_path) if model_path is not None else None,
        "config": asdict(engine.config),
        "messages": messages,
        "system_prompt": system_prompt,
        "engine": info,
    }
    return header, arrays


def save(path: str | Path, engine, *, messages: list[dict[str, str]], system_prompt: str | None,
         model_path: str | Path) -> int:
    """Write the session atomically; return its size in bytes."""
    header, arrays = capture(engine, messages=messages, system_prompt=system_prompt, model_path=model_path)
    pieces = encode(header, arrays)
    write_atomic(path, pieces)
    return sum(len(p) for p in pieces)


def restore(engine, session: Session) -> None:
    """Put ``engine`` (fresh, built with ``session.config()``, same model) into the saved state."""
    info = session.header["engine"]
    if info["cells"] != engine.cells:
        raise SessionError(f"the session needs a {info['cells']}-cell cache, this engine has {engine.cells}")
    from spindle_local.runtime.engine_state import StateError

    try:
        engine.load_state_dict(info, session.arrays)
    except StateError as e:
        raise SessionError(str(e)) from None
