"""Pieces shared by the Python-side input checks of memgen's ops (the C++ side: csrc/binding_utils.h)."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def describe(t: object) -> str:
    """`dtype[shape] on device` for a tensor, the type name for anything else (as error messages show it)."""
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)} on {t.device}"
