"""Build of memgen's compiled core, `memgen._C`.

CPU kernels are always built; CUDA kernels too when the installed torch was built with CUDA and
`nvcc` is found (architectures from TORCH_CUDA_ARCH_LIST, default sm_80 and sm_90).
MEMGEN_NO_EXT=1 skips native code: the package then runs its pure-PyTorch implementations and
`memgen.ops.backend()` says so.

Build against the torch you already have: `pip install --no-build-isolation .` (an isolated
build environment would download a different torch).
"""

import glob
import os

from setuptools import setup

CSRC = "csrc"


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
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        ext = CUDAExtension(
            "memgen._C",
            sources,
            define_macros=[("MEMGEN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
        )
    else:
        reason = "torch has no CUDA" if torch.version.cuda is None else "nvcc was not found"
        print(f"memgen: building CPU kernels only ({reason})")
        ext = CppExtension("memgen._C", sources, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
