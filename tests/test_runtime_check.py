"""The portable CPU build: instruction-set tiers, the build key, the smoke test and its fallback."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from spindle_local.errors import BuildError
from spindle_local.runtime import cpu_features as cf
from spindle_local.runtime.build import BuildConfig, patch_files
from spindle_local.runtime.smoke import decide, fatal_signal, run_smoke, verify

AVX512_CPU = frozenset("sse4_2 avx f16c fma bmi2 avx2 avx512f avx512cd avx512vl avx512dq avx512bw "
                       "avx512_vnni amx_tile amx_int8 amx_bf16".split())
AVX2_CPU = frozenset("sse4_2 avx f16c fma bmi2 avx2".split())


def _suicide(sig: signal.Signals) -> list[str]:
    """A real child process that dies by ``sig``, as a build with a bad instruction does."""
    return [sys.executable, "-c", f"import os, signal; os.kill(os.getpid(), signal.{sig.name})"]


def test_tiers_never_enable_amx_and_shrink() -> None:
    tiers = cf.isa_tiers(AVX512_CPU, x86=True)
    assert [t.name for t in tiers] == ["cpu", "avx2", "sse42", "generic"]
    for t in tiers:
        assert "-DGGML_NATIVE=OFF" in t.cmake_args
        assert all(f"-DGGML_AMX_{x}=OFF" in t.cmake_args for x in ("TILE", "INT8", "BF16"))
        assert not any(a.startswith("-DGGML_AMX") and a.endswith("=ON") for a in t.cmake_args)
    on = [{a for a in t.cmake_args if a.endswith("=ON")} for t in tiers]
    assert "-DGGML_AVX512=ON" in on[0] and "-DGGML_AVX512_VNNI=ON" in on[0]
    assert "-DGGML_AVX512=ON" not in on[1] and "-DGGML_AVX2=ON" in on[1]
    assert all(on[i + 1] < on[i] for i in range(len(on) - 1))
    # An AVX2-only CPU has no separate "cpu" tier: it would equal the avx2 one.
    assert [t.name for t in cf.isa_tiers(AVX2_CPU, x86=True)] == ["cpu", "sse42", "generic"]


def test_build_key_differs_with_instruction_sets() -> None:
    patches = patch_files()
    a = BuildConfig(isa=cf.isa_tiers(AVX512_CPU, x86=True)[0])
    b = BuildConfig(isa=cf.isa_tiers(AVX2_CPU, x86=True)[0])
    assert a.key(patches) != b.key(patches)
    assert a.key(patches) == BuildConfig(isa=cf.isa_tiers(AVX512_CPU, x86=True)[0]).key(patches)
    # The user's own CMake flags come last, so they override the tier's.
    c = BuildConfig(isa=a.isa, extra_cmake_args=("-DGGML_AVX512=OFF",))
    assert c.cmake_args()[-1] == "-DGGML_AVX512=OFF" and c.key(patches) != a.key(patches)


def test_cpu_flags_parse_and_fingerprint() -> None:
    text = "processor : 0\nflags\t\t: fpu sse4_2 avx2 avx512f\nbugs : x\n"
    assert cf.cpu_flags(text) == frozenset({"fpu", "sse4_2", "avx2", "avx512f"})
    assert cf.cpu_fingerprint(AVX512_CPU) != cf.cpu_fingerprint(AVX2_CPU)


def test_fatal_signal_codes() -> None:
    assert fatal_signal(-int(signal.SIGILL)) == signal.SIGILL
    assert fatal_signal(128 + int(signal.SIGSEGV)) == signal.SIGSEGV
    assert fatal_signal(0) is None and fatal_signal(1) is None and fatal_signal(-int(signal.SIGTERM)) is None


def test_sigill_child_leads_to_rebuild_decision() -> None:
    tiers = cf.isa_tiers(AVX512_CPU, x86=True)
    result = run_smoke(_suicide(signal.SIGILL))
    assert result.signal == signal.SIGILL and not result.ok
    d = decide(result, tiers[0], tiers)
    assert d.action == "rebuild" and d.tier == tiers[1]
    assert "SIGILL" in d.message and "rebuilding for avx2" in d.message
    # The last tier has nowhere to go: a clear failure, not a loop.
    last = decide(result, tiers[-1], tiers)
    assert last.action == "fail" and "most portable" in last.message
    # A child that fails without a signal is a plain failure, not an instruction-set problem.
    plain = decide(run_smoke([sys.executable, "-c", "raise SystemExit(3)"]), tiers[0], tiers)
    assert plain.action == "fail" and "exit 3" in plain.message


def test_verify_rebuilds_until_a_tier_runs(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real children: the first two builds "fault" (SIGILL, SIGSEGV), the third passes."""
    monkeypatch.setenv("SPINDLE_LOCAL_CACHE", str(tmp_path))
    tiers = cf.isa_tiers(AVX512_CPU, x86=True)
    children = iter([_suicide(signal.SIGILL), _suicide(signal.SIGSEGV), [sys.executable, "-c", "pass"]])
    rebuilt: list[str] = []
    messages: list[str] = []
    record = cf.load_record("test-cpu")
    passed = verify(tiers[0], tiers, lambda t: rebuilt.append(t.name), record=record,
                    smoke=lambda: run_smoke(next(children)), log=messages.append)
    assert passed == tiers[2] and rebuilt == ["avx2", "sse42"]
    assert record["faulted_tiers"] == {"cpu": "SIGILL", "avx2": "SIGSEGV"}
    assert len(messages) == 2 and "SIGILL" in messages[0]
    # The record steers the next build on this CPU past the faulted tiers.
    cf.save_record(record, "test-cpu")
    assert cf.select_tier(tiers, cf.load_record("test-cpu")) == tiers[2]

    always = iter([_suicide(signal.SIGILL)] * len(tiers))
    with pytest.raises(BuildError, match="most portable"):
        verify(tiers[0], tiers, lambda t: None, record=cf.load_record("other"),
               smoke=lambda: run_smoke(next(always)), log=lambda m: None)


@pytest.mark.model
def test_smoke_test_passes_on_installed_runtime() -> None:
    pytest.importorskip("llama_cpp")
    result = run_smoke()
    assert result.ok, result.describe()
    assert "smoke test passed" in result.detail


@pytest.mark.model
def test_native_crash_is_one_line() -> None:
    """A fatal signal in native code after the runtime is loaded: one line and exit 128+N."""
    pytest.importorskip("llama_cpp")
    code = ("from spindle_local.runtime import native; native.native(); "
            "import ctypes; ctypes.string_at(0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + int(signal.SIGSEGV)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the llama.cpp runtime died with SIGSEGV")
