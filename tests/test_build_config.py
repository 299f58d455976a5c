"""setup.py's choice of native code: which kernels it builds for which torch and toolkit, and the clear
error it stops with (before anything compiles) when a CUDA toolkit cannot build the CUDA kernels.

setup.py runs here with `setuptools.setup` replaced by a recorder, and with torch's CUDA version and
CUDA_HOME set per case, so no compiler runs.
"""

from __future__ import annotations

import re
import runpy
import stat
from pathlib import Path

import pytest
import setuptools
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]


def _toolkit(root: Path, release: str | None, header: bool = True) -> Path:
    """A fake CUDA toolkit: include/cuda_runtime.h (if `header`) and a bin/nvcc that names `release`."""
    (root / "include").mkdir(parents=True)
    if header:
        (root / "include" / "cuda_runtime.h").write_text("")
    (root / "bin").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n" if release
                    else "#!/bin/sh\nexit 3\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    return root


def _extensions(monkeypatch, torch_cuda: str | None, cuda_home: Path | None, **env: str) -> list:
    """The ext_modules setup.py passes to setup() under a torch built with CUDA `torch_cuda` (None: a CPU
    build) and torch's CUDA_HOME."""
    recorded = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: recorded.update(kwargs))
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None if cuda_home is None else str(cuda_home))
    for name in ("MEMGEN_NO_EXT", "MEMGEN_NO_CUDA", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    return recorded["ext_modules"]


def _is_cuda(extension) -> bool:
    return any(source.endswith(".cu") for source in extension.sources)


def test_a_cpu_torch_gets_the_cpu_kernels(monkeypatch):
    ext, = _extensions(monkeypatch, None, None)
    assert not _is_cuda(ext) and ext.sources


def test_a_cuda_torch_with_a_matching_toolkit_gets_the_cuda_kernels_too(monkeypatch, tmp_path):
    ext, = _extensions(monkeypatch, "12.8", _toolkit(tmp_path / "cuda", "12.4"))
    assert _is_cuda(ext) and ("MEMGEN_WITH_CUDA", "1") in ext.define_macros


def test_a_toolkit_without_headers_stops_the_build_naming_cuda_home(monkeypatch, tmp_path):
    home = _toolkit(tmp_path / "usr", "12.4", header=False)  # nvcc found on the PATH, outside the toolkit
    expected = rf"CUDA_HOME={re.escape(str(home))} has no include/cuda_runtime\.h.*MEMGEN_NO_CUDA=1"
    with pytest.raises(RuntimeError, match=expected):
        _extensions(monkeypatch, "12.8", home)


def test_a_toolkit_of_another_major_version_stops_the_build_naming_both(monkeypatch, tmp_path):
    with pytest.raises(RuntimeError, match=r"is CUDA 13\.0, torch was built with CUDA 12\.4.*MEMGEN_NO_CUDA=1"):
        _extensions(monkeypatch, "12.4", _toolkit(tmp_path / "cuda", "13.0"))


def test_an_nvcc_that_fails_stops_the_build(monkeypatch, tmp_path):
    with pytest.raises(RuntimeError, match=r"nvcc --version failed"):
        _extensions(monkeypatch, "12.4", _toolkit(tmp_path / "cuda", None))


def test_memgen_no_cuda_builds_the_cpu_kernels_whatever_the_toolkit(monkeypatch, tmp_path):
    ext, = _extensions(monkeypatch, "12.4", _toolkit(tmp_path / "cuda", "13.0"), MEMGEN_NO_CUDA="1")
    assert not _is_cuda(ext) and ext.sources


def test_memgen_no_ext_builds_no_native_code(monkeypatch):
    assert _extensions(monkeypatch, "12.4", None, MEMGEN_NO_EXT="1") == []
