"""Which x86 instruction sets the CPU build of llama.cpp is compiled for.

Why not ``-march=native``: ggml then compiles in every kernel the CPU reports, AMX tiles
included, and on some virtual machines that report AMX the AMX matrix kernels die with
SIGILL although a plain ``tilezero`` runs. So the build is never native on x86-64: it
names each instruction set explicitly (``GGML_NATIVE=OFF`` plus ``GGML_AVX2=ON`` ...), from
what the CPU reports, AMX always off. Each *tier* is one such set, best first; a tier
whose smoke test dies by a signal on this CPU is recorded (``faulted_tiers``) and the next
one is built. The flags are part of the build key, so a wheel is only reused on CPUs that
run the same instruction sets.

On other machines (arm64 Linux, macOS) ggml's native build has no such kernels; the tiers
there are ``native`` and a portable ``generic`` fallback.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from spindle_local.paths import cache_root

#: ggml's x86 options, each with the /proc/cpuinfo flags it needs.
_X86_OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512vbmi",)),
    ("GGML_AVX512_VNNI", ("avx512_vnni",)),
    ("GGML_AVX512_BF16", ("avx512_bf16",)),
)
#: Never compiled in (see the module docstring).
_ALWAYS_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
#: The options of each x86 tier below the best one.
_AVX2_TIER = ("GGML_SSE42", "GGML_AVX", "GGML_F16C", "GGML_FMA", "GGML_BMI2", "GGML_AVX2")
_SSE_TIER = ("GGML_SSE42",)


@dataclass(frozen=True)
class IsaTier:
    """One instruction-set choice for the CPU build: a name and its CMake flags."""

    name: str
    cmake_args: tuple[str, ...]


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where it is not readable)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _x86_args(enabled: set[str]) -> tuple[str, ...]:
    args = ["-DGGML_NATIVE=OFF"]
    for option, _ in _X86_OPTIONS:
        args.append(f"-D{option}={'ON' if option in enabled else 'OFF'}")
    args += [f"-D{option}=OFF" for option in _ALWAYS_OFF]
    return tuple(args)


def isa_tiers(flags: frozenset[str] | None = None, *, x86: bool | None = None) -> list[IsaTier]:
    """The build tiers for a CPU with ``flags``, best first, each strictly smaller."""
    x86 = is_x86() if x86 is None else x86
    if not x86:
        return [IsaTier("native", ()), IsaTier("generic", ("-DGGML_NATIVE=OFF",))]
    flags = cpu_flags() if flags is None else flags
    have = {option for option, needs in _X86_OPTIONS if all(f in flags for f in needs)}
    candidates = [
        ("cpu", have),
        ("avx2", have & set(_AVX2_TIER)),
        ("sse42", have & set(_SSE_TIER)),
        ("generic", set()),
    ]
    tiers: list[IsaTier] = []
    seen: list[set[str]] = []
    for name, enabled in candidates:
        if any(enabled == s for s in seen):
            continue
        seen.append(enabled)
        tiers.append(IsaTier(name, _x86_args(enabled)))
    return tiers


def cpu_fingerprint(flags: frozenset[str] | None = None) -> str:
    """A short digest of what makes a build valid on this CPU (architecture + feature flags)."""
    flags = cpu_flags() if flags is None else flags
    h = hashlib.sha256()
    h.update(f"{platform.machine()}\0{sys.platform}\0".encode())
    h.update(" ".join(sorted(flags)).encode())
    return h.hexdigest()[:16]


def _record_path(fingerprint: str) -> Path:
    return cache_root() / "cpu" / f"{fingerprint}.json"


def load_record(fingerprint: str | None = None) -> dict:
    """What is known about this CPU: ``{"faulted_tiers": {tier: signal name}, "smoke_ok": [keys]}``."""
    try:
        data = json.loads(_record_path(fingerprint or cpu_fingerprint()).read_text())
    except (OSError, ValueError):
        data = {}
    data.setdefault("faulted_tiers", {})
    data.setdefault("smoke_ok", [])
    return data


def save_record(record: dict, fingerprint: str | None = None) -> None:
    path = _record_path(fingerprint or cpu_fingerprint())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def select_tier(tiers: list[IsaTier] | None = None, record: dict | None = None) -> IsaTier:
    """The best tier that has not faulted on this CPU (the last one if all have)."""
    tiers = tiers or isa_tiers()
    record = load_record() if record is None else record
    for tier in tiers:
        if tier.name not in record["faulted_tiers"]:
            return tier
    return tiers[-1]


def next_tier(current: str, tiers: list[IsaTier] | None = None) -> IsaTier | None:
    """The tier after ``current`` (None when ``current`` is the last)."""
    tiers = tiers or isa_tiers()
    names = [t.name for t in tiers]
    if current not in names:
        return tiers[0]
    i = names.index(current)
    return tiers[i + 1] if i + 1 < len(tiers) else None
