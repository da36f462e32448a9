"""Backend builds: the CMake flags each backend gets and the checks made before a build starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spindle_local.errors import BuildError
from spindle_local.runtime.build import BACKENDS, DEV_BACKENDS, BuildConfig, check_prerequisites, main


def _headers(root: Path, version: int, layer_settings: bool) -> Path:
    """A Vulkan include folder whose vulkan_core.h has (or lacks) VK_EXT_layer_settings."""
    (root / "vulkan").mkdir(parents=True)
    text = f"#define VK_HEADER_VERSION {version}\n"
    text += "#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION(0, 1, 3, VK_HEADER_VERSION)\n"
    if layer_settings:
        text += "#define VK_EXT_layer_settings 1\n"
    (root / "vulkan" / "vulkan_core.h").write_text(text)
    return root


def _glslc_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, present: bool) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if present:
        tool = bin_dir / "glslc"
        tool.write_text("#!/bin/sh\nexit 0\n")
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


def test_vulkan_is_built_by_scripts_but_not_offered_by_setup() -> None:
    assert "vulkan" in DEV_BACKENDS and "vulkan" not in BACKENDS
    assert "-DGGML_VULKAN=ON" in BuildConfig(backend="vulkan").cmake_args()
    assert "-DGGML_VULKAN=ON" not in BuildConfig(backend="cpu").cmake_args()


def test_cmake_args_are_printed_for_scripts(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setenv("SPINDLE_CMAKE_ARGS", "-DVulkan_INCLUDE_DIR=/opt/vk/include")
    assert main(["--backend", "vulkan", "--cmake-args"]) == 0
    args = capsys.readouterr().out.split()
    assert "-DGGML_VULKAN=ON" in args and "-DGGML_RPC=ON" in args
    assert args[-1] == "-DVulkan_INCLUDE_DIR=/opt/vk/include"  # the user's flags last, so they win


def test_vulkan_headers_without_layer_settings_are_refused(tmp_path, monkeypatch) -> None:
    _glslc_on_path(tmp_path, monkeypatch, present=True)
    old = _headers(tmp_path / "old", 239, layer_settings=False)
    with pytest.raises(BuildError, match=r"1\.3\.239\) are too old"):
        check_prerequisites(BuildConfig(backend="vulkan", extra_cmake_args=(f"-DVulkan_INCLUDE_DIR={old}",)))
    new = _headers(tmp_path / "new", 309, layer_settings=True)
    # the last definition wins, as in CMake; a typed one counts too
    check_prerequisites(BuildConfig(backend="vulkan", extra_cmake_args=(
        f"-DVulkan_INCLUDE_DIR={old}", f"-DVulkan_INCLUDE_DIR:PATH={new}")))


def test_vulkan_without_glslc_or_headers_fails_in_one_line(tmp_path, monkeypatch) -> None:
    _glslc_on_path(tmp_path, monkeypatch, present=False)
    with pytest.raises(BuildError, match="glslc"):
        check_prerequisites(BuildConfig(backend="vulkan"))
    monkeypatch.setenv("PATH", os.pathsep.join([str(tmp_path / "bin"), "/usr/bin", "/bin"]))
    (tmp_path / "bin" / "glslc").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "glslc").chmod(0o755)
    with pytest.raises(BuildError, match="no Vulkan headers") as err:
        check_prerequisites(BuildConfig(backend="vulkan", extra_cmake_args=(f"-DVulkan_INCLUDE_DIR={tmp_path}/none",)))
    assert "\n" not in str(err.value)
    check_prerequisites(BuildConfig(backend="cpu"))  # other backends need nothing checked here
