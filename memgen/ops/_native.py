"""Loads memgen's compiled core (`memgen._C`) once and remembers why it could not be loaded."""

from __future__ import annotations

import functools
import importlib


@functools.lru_cache(maxsize=1)
def load() -> tuple[bool, str]:
    """Import `memgen._C`, which registers the `torch.ops.memgen.*` kernels.

    Returns (loaded, detail): detail is the library's path when loaded, else the reason it is not.
    """
    try:
        module = importlib.import_module("memgen._C")
    except ModuleNotFoundError:
        return False, (
            "memgen._C is not built: the package was installed with MEMGEN_NO_EXT=1 or without "
            "its build step (install with `pip install --no-build-isolation .`)"
        )
    except ImportError as err:  # built, but unloadable: usually a torch/ABI mismatch
        return False, (
            f"memgen._C failed to load ({err}); it was probably built against another torch: "
            "rebuild with `pip install --no-build-isolation --force-reinstall --no-deps .`"
        )
    return True, str(module.__file__)
