"""Which implementation runs each op, and why: never a silent fallback.

Implementations, in order of preference under `auto`:
- `native`: the C++ CPU kernel or CUDA kernel of `memgen._C`;
- `triton`: the Triton kernel (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1, for tests);
- `torch`: the plain PyTorch reference, which is also every test's oracle.

The preference comes from `set_backend(...)` or the MEMGEN_OPS_BACKEND environment variable
(`auto`, `native`, `triton` or `torch`). Asking for an implementation that cannot run raises.
Only trigger scoring has a Triton kernel: the ragged-step ops move bytes in one CUDA launch
already, so under a `triton` preference they take `auto`'s choice (`backend()` shows which).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field

import torch

from memgen.ops import _native

IMPLEMENTATIONS = ("native", "triton", "torch")
_CHOICES = ("auto",) + IMPLEMENTATIONS
OPS = ("trigger_scoring", "pack_step", "pack_ragged", "write_kv")
TRITON_OPS = ("trigger_scoring",)

_preference: str | None = None


def set_backend(name: str) -> None:
    """Prefer one implementation for every op (`auto`, `native`, `triton` or `torch`)."""
    global _preference
    if name not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {name!r}")
    _preference = name


def preference() -> str:
    """The implementation asked for: set_backend's, else MEMGEN_OPS_BACKEND's (read once), else `auto`."""
    return _preference if _preference is not None else _environment_preference()


@functools.lru_cache(maxsize=1)
def _environment_preference() -> str:
    name = os.environ.get("MEMGEN_OPS_BACKEND", "auto")
    if name not in _CHOICES:
        raise ValueError(f"MEMGEN_OPS_BACKEND must be one of {_CHOICES}, got {name!r}")
    return name


@functools.lru_cache(maxsize=None)
def unavailable_reason(impl: str, op: str, device_type: str) -> str | None:
    """Why `impl` cannot run `op` on `device_type` tensors, or None when it can (fixed for the process)."""
    if impl == "torch":
        return None
    if impl == "native":
        loaded, detail = _native.load()
        if not loaded:
            return detail
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
        if key is None:
            return f"memgen._C has no kernels for {device_type} tensors"
        overload = getattr(torch.ops.memgen, op).default
        if not overload.has_kernel_for_dispatch_key(key):
            return f"memgen._C was built without {key} kernels"
        return None
    if impl == "triton":
        if op not in TRITON_OPS:
            return f"{op} has no Triton kernel"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on {device_type} tensors"
        return None
    raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLEMENTATIONS}")


def select(op: str, device_type: str, requested: str | None = None) -> str:
    """The implementation that runs `op` on `device_type` tensors.

    `requested` overrides the global preference for one call. An explicit request that cannot
    run raises RuntimeError with the reason; `auto` takes the first available implementation.
    """
    return _select(op, device_type, requested or preference())


@functools.lru_cache(maxsize=None)
def _select(op: str, device_type: str, name: str) -> str:
    if name == "triton" and op not in TRITON_OPS:
        name = "auto"
    if name != "auto":
        reason = unavailable_reason(name, op, device_type)
        if reason is not None:
            raise RuntimeError(f"memgen.ops.{op}: the {name!r} backend cannot run on {device_type}: {reason}")
        return name
    auto_order = ("native", "triton", "torch") if device_type == "cuda" else ("native", "torch")
    for impl in auto_order:
        if unavailable_reason(impl, op, device_type) is None:
            return impl
    raise AssertionError("unreachable: the torch reference always runs")


@dataclass
class BackendReport:
    """What `backend()` returns: the native library's state and each op's implementation per device."""

    preference: str
    native_loaded: bool
    native_detail: str
    ops: dict[str, dict[str, str]] = field(default_factory=dict)
    fallbacks: dict[str, dict[str, str]] = field(default_factory=dict)

    def __str__(self) -> str:
        state = "loaded from" if self.native_loaded else "not loaded:"
        lines = [f"memgen ops (preference: {self.preference}); native library {state} {self.native_detail}"]
        for op, per_device in self.ops.items():
            for device, impl in per_device.items():
                why = self.fallbacks.get(op, {}).get(device)
                lines.append(f"  {op} [{device}]: {impl}" + (f" (native unavailable: {why})" if why else ""))
        return "\n".join(lines)


def backend() -> BackendReport:
    """Report which implementation each op uses on CPU (and CUDA, when present) and why."""
    loaded, detail = _native.load()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = BackendReport(preference=preference(), native_loaded=loaded, native_detail=detail)
    for op in OPS:
        report.ops[op] = {}
        for device in devices:
            try:
                impl = select(op, device)
            except RuntimeError as err:
                impl = f"unavailable ({err})"
            report.ops[op][device] = impl
            native_reason = unavailable_reason("native", op, device)
            if impl != "native" and native_reason is not None:
                report.fallbacks.setdefault(op, {})[device] = native_reason
    return report
