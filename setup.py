"""Build of memgen's compiled core, `memgen._C`.

CPU kernels are always built; CUDA kernels too when the installed torch was built with CUDA and
`nvcc` is found (architectures from TORCH_CUDA_ARCH_LIST, default sm_80 and sm_90). A toolkit that
cannot build them (no CUDA headers under CUDA_HOME, or another CUDA major version than torch's) stops
the build with the reason before anything compiles. MEMGEN_NO_CUDA=1 builds the CPU kernels only
(CUDA tensors then take the Triton or PyTorch implementations); MEMGEN_NO_EXT=1 skips native code:
the package then runs its pure-PyTorch implementations. `memgen.ops.backend()` says which run.

Build against the torch you already have: `pip install --no-build-isolation .` (an isolated
build environment would download a different torch).
"""

import glob
import os
import re
import subprocess

import setuptools
from setuptools import setup

CSRC = "csrc"

if int(setuptools.__version__.split(".")[0]) < 77:  # pyproject.toml's SPDX license string needs it
    raise RuntimeError(f"memgen's build needs setuptools >= 77, found {setuptools.__version__}: "
                       "pip install 'setuptools>=77', then pip install --no-build-isolation . again")


def _native_extensions():
    if os.environ.get("MEMGEN_NO_EXT", "0") == "1":
        print("memgen: MEMGEN_NO_EXT=1, building without native code")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import (
            CUDA_HOME,
            BuildExtension,
            CppExtension,
            CUDAExtension,
        )
    except ImportError as err:
        raise RuntimeError(
            "memgen builds its C++/CUDA core against an installed torch; install torch first "
            "(e.g. `pip install torch==2.13.0`), then `pip install --no-build-isolation .`"
        ) from err

    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp"))) + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-Wall"]
    no_cuda = os.environ.get("MEMGEN_NO_CUDA", "0") == "1"
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not no_cuda
    if with_cuda:
        problem = _cuda_toolkit_problem(CUDA_HOME, torch.version.cuda)
        if problem is not None:
            raise RuntimeError(f"memgen: cannot build CUDA kernels: {problem}. Point CUDA_HOME at a CUDA toolkit "
                               "of torch's major version, or build the CPU kernels only with MEMGEN_NO_CUDA=1")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        ext = CUDAExtension(
            "memgen._C",
            sources,
            define_macros=[("MEMGEN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
        )
    else:
        reason = ("MEMGEN_NO_CUDA=1" if no_cuda else "torch has no CUDA" if torch.version.cuda is None
                  else "nvcc was not found")
        print(f"memgen: building CPU kernels only ({reason})")
        ext = CppExtension("memgen._C", sources, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension}


def _cuda_toolkit_problem(cuda_home: str, torch_cuda: str) -> str | None:
    """Why the toolkit at `cuda_home` cannot build kernels for a torch built with CUDA `torch_cuda` (None: it
    can). torch finds CUDA_HOME from `nvcc` on the PATH when it is not set, which misses the headers where
    nvcc is a wrapper or link outside the toolkit; a toolkit of another major version than torch's fails
    deep in the build."""
    header = os.path.join(cuda_home, "include", "cuda_runtime.h")
    if not os.path.isfile(header):
        return f"CUDA_HOME={cuda_home} has no include/cuda_runtime.h"
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        banner = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        return f"{nvcc} --version failed ({err})"
    found = re.search(r"release (\d+)\.(\d+)", banner)
    if found is None:
        return f"{nvcc} --version names no release: {banner.strip()!r}"
    if found.group(1) != torch_cuda.split(".")[0]:
        return f"{nvcc} is CUDA {found.group(1)}.{found.group(2)}, torch was built with CUDA {torch_cuda}"
    return None


ext_modules, cmdclass = _native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
