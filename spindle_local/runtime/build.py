"""Build and install the patched llama.cpp runtime (llama-cpp-python + patches/*.patch).

Why a rebuild: the compressed KV store lives inside llama.cpp, so the shared library that
llama-cpp-python loads must carry our patch. The build is:

1. fetch the llama-cpp-python source distribution (pinned version) with pip, once;
2. extract it, apply every ``patches/*.patch`` (sorted by name) to the llama.cpp it
   vendors — a patch that does not apply stops the build and is named;
3. build a wheel with pip (scikit-build-core + CMake), showing progress;
4. cache the wheel under a key made of the version, the sha256 of the patches and the
   build flags, and install it into the running interpreter's environment.

A second run with nothing changed finds the installed build stamp (or the cached wheel)
and takes seconds. This module imports neither llama_cpp nor click, so it can run
before either is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from spindle_local.errors import BuildError
from spindle_local.paths import build_dir, cache_root, wheels_dir
from spindle_local.runtime.cpu_features import IsaTier, load_record, select_tier

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
STAMP_NAME = "spindle_build.json"
BACKENDS = ("cpu", "cuda", "metal")  # what `spindle-local setup --backend` offers
# Also built by ``python -m spindle_local.runtime.build`` and scripts/build_vulkan.sh, for
# checking the patch on a Vulkan device: not offered to users while reading with a store
# corrupts memory on Mesa's software Vulkan device (docs/benchmarks.md, Backends).
DEV_BACKENDS = BACKENDS + ("vulkan",)

# Flags that keep the build to what spindle-local uses: the llama library and ggml's RPC backend.
_BASE_CMAKE_ARGS = [
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_CURL=OFF",
    "-DGGML_RPC=ON",  # layers on other machines (spindle-local rpc-server, --rpc)
]
_BACKEND_CMAKE_ARGS = {
    "cpu": [],
    "cuda": ["-DGGML_CUDA=ON"],
    "metal": ["-DGGML_METAL=ON"],
    "vulkan": ["-DGGML_VULKAN=ON"],
}


def patches_dir() -> Path:
    """The ``patches/`` folder of the source checkout (or of an installed copy)."""
    env = os.environ.get("SPINDLE_LOCAL_PATCHES")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "patches"
        if candidate.is_dir() and (parent / "pyproject.toml").is_file():
            return candidate
    raise BuildError("cannot find the patches/ folder; set SPINDLE_LOCAL_PATCHES to its path")


def patch_files(folder: Path | None = None) -> list[Path]:
    folder = folder or patches_dir()
    return sorted(folder.glob("*.patch"))


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines the built wheel; its key names the cache entry."""

    backend: str = "cpu"
    extra_cmake_args: tuple[str, ...] = ()
    version: str = LLAMA_CPP_PYTHON_VERSION
    #: instruction sets of the CPU code (``cpu_features``); None: the best tier that has
    #: not faulted on this CPU.
    isa: IsaTier | None = None

    def resolved_isa(self) -> IsaTier:
        return self.isa if self.isa is not None else select_tier()

    def cmake_args(self) -> list[str]:
        # The user's SPINDLE_CMAKE_ARGS come last, so CMake lets them override the tier.
        return (_BASE_CMAKE_ARGS + _BACKEND_CMAKE_ARGS[self.backend]
                + list(self.resolved_isa().cmake_args) + list(self.extra_cmake_args))

    def key(self, patches: list[Path]) -> str:
        h = hashlib.sha256()
        h.update(f"llama-cpp-python=={self.version}\n".encode())
        for p in patches:
            h.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
        # The instruction-set flags are among the CMake arguments: CPUs that run different
        # instruction sets get different keys.
        h.update(("\0".join(self.cmake_args())).encode())
        h.update(platform.machine().encode() + sys.platform.encode())
        return f"{self.version}-{self.backend}-{h.hexdigest()[:16]}"


def installed_stamp() -> dict | None:
    """The build stamp of the llama_cpp installed in this environment, or None."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    stamp = Path(list(spec.submodule_search_locations)[0]) / STAMP_NAME
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run_pip(args: list[str], what: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise BuildError(f"{what} failed: {tail}")


def fetch_sdist(version: str) -> Path:
    """The llama-cpp-python source distribution, downloaded with pip once and cached."""
    folder = cache_root() / "sdist"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"llama_cpp_python-{version}.tar.gz"
    target = folder / name
    if target.is_file():
        return target
    _log(f"fetching the llama-cpp-python {version} source distribution with pip ...")
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        _run_pip(
            ["download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
             f"llama-cpp-python=={version}"],
            "downloading the llama-cpp-python source",
        )
        found = list(Path(tmp).glob("*.tar.gz"))
        if not found:
            raise BuildError("pip did not deliver a llama-cpp-python source archive")
        os.replace(found[0], target)
    return target


def prepare_source(sdist: Path, patches: list[Path], dest: Path, key: str, isa: dict | None = None) -> Path:
    """Extract the sdist into ``dest`` and apply the patches; return the source root.

    The tree is kept (with a ``.prepared`` marker) so that an interrupted build resumes
    in the same CMake build folder instead of starting over.
    """
    marker = dest / ".prepared"
    if marker.is_file():
        return dest / marker.read_text().strip()
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(sdist) as tf:
        tf.extractall(dest, filter="data")
    roots = [p for p in dest.iterdir() if p.is_dir()]
    if len(roots) != 1:
        raise BuildError(f"unexpected layout in {sdist.name}")
    root = roots[0]
    vendor = root / "vendor" / "llama.cpp"
    # The sdist carries a git-submodule pointer file that would confuse git-aware tools.
    git_pointer = vendor / ".git"
    if git_pointer.is_file():
        git_pointer.unlink()
    for patch in patches:
        proc = subprocess.run(
            ["patch", "-p1", "--forward", "--batch", "-i", str(patch)],
            cwd=vendor, capture_output=True, text=True,
        )
        if proc.returncode != 0:
            detail = (proc.stdout.strip().splitlines() or ["no output"])[-1]
            raise BuildError(f"patch {patch.name} does not apply to llama.cpp of llama-cpp-python "
                             f"{LLAMA_CPP_PYTHON_VERSION}: {detail}")
    stamp = {"key": key, "patches": [p.name for p in patches], "isa": isa or {},
             "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (root / "llama_cpp" / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n")
    marker.write_text(root.name + "\n")
    return root


# CMake progress: "[ 45%] Building ..." (make) or "[63/140] /usr/bin/g++ ..." (ninja).
_PROGRESS_PCT = re.compile(r"\[\s*(\d+)%\]")
_PROGRESS_NINJA = re.compile(r"^\s*\[(\d+)/(\d+)\]")


def _progress_printer() -> Callable[[str], None]:
    last = {"pct": -1}
    interactive = sys.stderr.isatty()

    def show(line: str) -> None:
        m = _PROGRESS_NINJA.match(line)
        if m:
            pct = int(m.group(1)) * 100 // max(int(m.group(2)), 1)
        else:
            m = _PROGRESS_PCT.search(line)
            if not m:
                return
            pct = int(m.group(1))
        if pct == last["pct"]:
            return
        last["pct"] = pct
        if interactive:
            bar = "#" * (pct // 4)
            print(f"\r  building llama.cpp [{bar:<25}] {pct:3d}%", end="", file=sys.stderr, flush=True)
        elif pct % 10 == 0:
            _log(f"  building llama.cpp: {pct}%")

    return show


def _cmake_define(args: tuple[str, ...], name: str) -> str | None:
    """The value of ``-Dname=VALUE`` (or ``-Dname:TYPE=VALUE``) among CMake arguments, the last one wins."""
    found = None
    for a in args:
        m = re.fullmatch(rf"-D{re.escape(name)}(?::\w+)?=(.*)", a)
        if m:
            found = m.group(1)
    return found


def check_prerequisites(cfg: BuildConfig) -> None:
    """Fail early, in one line, where a backend's build would fail minutes into CMake.

    ggml's Vulkan backend compiles its shaders with ``glslc`` and uses
    ``VK_EXT_layer_settings``, which older Vulkan headers lack (Debian 12's 1.3.239 among
    them): the headers CMake would find are checked before anything is built.
    """
    if cfg.backend != "vulkan":
        return
    if shutil.which("glslc") is None:
        raise BuildError("the Vulkan backend needs the glslc shader compiler on PATH "
                         "(Debian/Ubuntu: apt install glslc glslang-tools spirv-headers; or the Vulkan SDK)")
    inc = _cmake_define(cfg.extra_cmake_args, "Vulkan_INCLUDE_DIR")
    if inc is None:
        inc = str(Path(os.environ["VULKAN_SDK"]) / "include") if os.environ.get("VULKAN_SDK") else "/usr/include"
    header = Path(inc) / "vulkan" / "vulkan_core.h"
    try:
        text = header.read_text(errors="replace")
    except OSError:
        raise BuildError(f"no Vulkan headers at {header} (Debian/Ubuntu: apt install libvulkan-dev; "
                         "or pass -DVulkan_INCLUDE_DIR=DIR in SPINDLE_CMAKE_ARGS)") from None
    if "VK_EXT_layer_settings" not in text:
        patch = re.search(r"#define VK_HEADER_VERSION (\d+)", text)
        api = re.search(r"#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION\(\d+, (\d+), (\d+),", text)
        version = (f"{api.group(1)}.{api.group(2)}.{patch.group(1)}" if api and patch
                   else f"header version {patch.group(1)}" if patch else "unknown version")
        raise BuildError(f"the Vulkan headers in {inc} ({version}) are too old for ggml's Vulkan backend "
                         "(no VK_EXT_layer_settings): pass newer ones (the Vulkan SDK's, or a newer "
                         "libvulkan-dev's) with -DVulkan_INCLUDE_DIR=DIR in SPINDLE_CMAKE_ARGS")


def build_wheel(src_root: Path, cfg: BuildConfig, key: str, out_dir: Path) -> Path:
    """Build the wheel from a prepared source tree, streaming CMake progress."""
    check_prerequisites(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["CMAKE_ARGS"] = " ".join(cfg.cmake_args())
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    cmake_build = build_dir() / key / "cmake"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(out_dir),
           "-C", f"build-dir={cmake_build}", str(src_root)]
    _log(f"building the patched runtime (llama-cpp-python {cfg.version}, backend {cfg.backend}, "
         f"CPU instruction sets: {cfg.resolved_isa().name}); "
         "this takes a few minutes the first time ...")
    show = _progress_printer()
    log_path = cache_root() / "build.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            show(line)
        rc = proc.wait()
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if rc != 0:
        raise BuildError(f"building the patched runtime failed (exit {rc}); see {log_path}")
    wheels = sorted(out_dir.glob("llama_cpp_python-*.whl"))
    if not wheels:
        raise BuildError(f"the build produced no wheel; see {log_path}")
    _log(f"built in {time.monotonic() - t0:.0f} s")
    return wheels[-1]


def cached_or_built_wheel(cfg: BuildConfig, patches: list[Path], key: str, *, force: bool = False) -> tuple[Path, str]:
    """The wheel for ``key`` from the cache, building it first when missing (or forced)."""
    cache = wheels_dir() / key
    wheels = sorted(cache.glob("llama_cpp_python-*.whl"))
    if wheels and not force:
        return wheels[-1], "installed-cached"
    sdist = fetch_sdist(cfg.version)
    src = prepare_source(sdist, patches, build_dir() / key / "src", key,
                         {"tier": cfg.resolved_isa().name, "faulted_tiers": load_record()["faulted_tiers"]})
    tmp_out = cache.with_name(cache.name + ".partial")
    shutil.rmtree(tmp_out, ignore_errors=True)
    built = build_wheel(src, cfg, key, tmp_out)
    if cache.exists():
        shutil.rmtree(cache)
    os.replace(tmp_out, cache)
    # The wheel is what we keep; the build tree (hundreds of MB) is only for resuming.
    shutil.rmtree(build_dir() / key, ignore_errors=True)
    return cache / built.name, "built"


def stock_lib_dir(cfg: BuildConfig | None = None) -> Path | None:
    """Where ``ensure_stock_library`` puts the unpatched llama.cpp libraries for ``cfg``."""
    cfg = cfg or BuildConfig()
    return cache_root() / "stock-lib" / cfg.key([])


def ensure_stock_library(cfg: BuildConfig | None = None) -> Path:
    """Build (once) the *unpatched* llama-cpp-python wheel and unpack its libraries.

    Benchmarks load it in a child process through ``LLAMA_CPP_LIB_PATH`` to compare
    against stock llama.cpp in the same run; it is never installed.
    """
    cfg = cfg or BuildConfig()
    key = cfg.key([])
    target = stock_lib_dir(cfg)
    assert target is not None
    if (target / "libllama.so").exists() or (target / "libllama.dylib").exists():
        return target
    wheel, _ = cached_or_built_wheel(cfg, [], key)
    import zipfile

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith("llama_cpp/lib/") and not name.endswith("/"):
                (tmp / Path(name).name).write_bytes(zf.read(name))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def ensure_runtime(cfg: BuildConfig | None = None, *, force: bool = False) -> dict:
    """Make sure the patched runtime for ``cfg`` is installed; build it only if needed.

    Returns a small report: ``{"key", "action", "seconds", "wheel"}`` where action is
    ``"none"`` (already installed), ``"installed-cached"`` or ``"built"``.
    """
    cfg = cfg or BuildConfig()
    t0 = time.monotonic()
    patches = patch_files()
    key = cfg.key(patches)
    stamp = installed_stamp()
    if not force and stamp and stamp.get("key") == key:
        return {"key": key, "action": "none", "seconds": time.monotonic() - t0, "wheel": None}

    wheel, action = cached_or_built_wheel(cfg, patches, key, force=force)
    wheels = [wheel]
    _log(f"installing the patched runtime {wheels[-1].name} ({key}) ...")
    _run_pip(["install", "--no-deps", "--force-reinstall", "-q", str(wheels[-1])],
             "installing the patched runtime")
    # llama-cpp-python's own light dependencies (we install its wheel with --no-deps).
    missing = [m for m in ("typing_extensions", "diskcache", "jinja2") if importlib.util.find_spec(m) is None]
    if missing:
        _run_pip(["install", "-q", *[m.replace("_", "-") for m in missing]], "installing runtime dependencies")
    return {"key": key, "action": action, "seconds": time.monotonic() - t0, "wheel": str(wheels[-1])}


def ensure_verified(cfg: BuildConfig) -> dict:
    """Smoke-test the installed runtime on this CPU once per build; rebuild smaller on a fatal signal.

    Returns ``{"tier", "action"}``: action ``"known"`` (this build already passed on this
    CPU), ``"passed"`` or ``"rebuilt"`` (an instruction-set tier faulted and a smaller one
    passed; the fault is recorded for this CPU and in the new build's stamp).
    """
    from dataclasses import replace

    from spindle_local.runtime.cpu_features import isa_tiers, save_record
    from spindle_local.runtime.smoke import verify

    record = load_record()
    stamp = installed_stamp() or {}
    if stamp.get("key") in record["smoke_ok"]:
        return {"tier": cfg.resolved_isa().name, "action": "known"}
    first = cfg.resolved_isa()
    _log(f"testing the runtime on this CPU (instruction sets: {first.name}) ...")

    def rebuild(tier: IsaTier) -> None:
        save_record(record)  # the next build's stamp names the faulted tiers
        ensure_runtime(replace(cfg, isa=tier))

    try:
        passed = verify(first, isa_tiers(), rebuild, record=record)
    finally:
        save_record(record)
    key = (installed_stamp() or {}).get("key")
    if key:
        record["smoke_ok"].append(key)
        save_record(record)
    return {"tier": passed.name, "action": "passed" if passed == first else "rebuilt"}


def main(argv: list[str] | None = None) -> int:
    """``python -m spindle_local.runtime.build``: the build step without the CLI's dependencies."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=DEV_BACKENDS, default=os.environ.get("SPINDLE_BACKEND", "cpu"))
    ap.add_argument("--force", action="store_true", help="rebuild even if a cached wheel exists")
    ap.add_argument("--source", metavar="DIR", type=Path,
                    help="only prepare the patched llama.cpp source in DIR and print its path "
                         "(for scripts that build the library themselves)")
    ap.add_argument("--cmake-args", action="store_true", help="only print the backend's CMake arguments")
    args = ap.parse_args(argv)
    extra = tuple(os.environ.get("SPINDLE_CMAKE_ARGS", "").split())
    cfg = BuildConfig(backend=args.backend, extra_cmake_args=extra)
    if args.cmake_args:
        print(" ".join(cfg.cmake_args()))
        return 0
    try:
        if args.source is not None:
            check_prerequisites(cfg)
            patches = patch_files()
            root = prepare_source(fetch_sdist(cfg.version), patches, args.source, cfg.key(patches))
            print(root / "vendor" / "llama.cpp")
            return 0
        report = ensure_runtime(cfg, force=args.force)
    except BuildError as e:
        _log(f"error: {e}")
        return e.exit_code
    _log(f"runtime ready ({report['action']}, {report['seconds']:.1f} s): {report['key']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
