"""Python face of memgen's compiled ops: torch references, fake kernels, Triton kernels, backend selection.

`backend()` reports which implementation each op runs on each device and, when the native library
is missing, why; `set_backend(...)` (or MEMGEN_OPS_BACKEND) chooses one explicitly.
"""

from memgen.ops.ragged import (
    pack_ragged,
    pack_ragged_reference,
    pack_step,
    pack_step_reference,
    write_kv,
    write_kv_reference,
)
from memgen.ops.selection import BackendReport, backend, set_backend
from memgen.ops.trigger_scoring import MODES as TRIGGER_MODES
from memgen.ops.trigger_scoring import trigger_scoring, trigger_scoring_reference

__all__ = [
    "BackendReport",
    "TRIGGER_MODES",
    "backend",
    "pack_ragged",
    "pack_ragged_reference",
    "pack_step",
    "pack_step_reference",
    "set_backend",
    "trigger_scoring",
    "trigger_scoring_reference",
    "write_kv",
    "write_kv_reference",
]
