"""Sharded models (FSDP, DeepSpeed ZeRO-3): how memgen recognises them, and the root's own parameters
gathered for decoding.

Under FSDP each wrapped unit (typically a decoder layer) gathers its parameters in its forward, so
the engine's decoder calls work as they are, provided every rank makes the same calls
(`MemGenModel.generate(synced_ranks=...)`). The root's own parameters (embeddings, LM head, the
weaver's projections and queries, the trigger's head) are read directly by the engine, outside any
forward, so they are gathered once for the whole call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel


def sharding_of(model: nn.Module) -> str | None:
    """'fsdp' when some module of `model` is FSDP-wrapped (FSDP1 or `fully_shard`), 'zero3' when its
    parameters are partitioned by DeepSpeed ZeRO-3, else None."""
    if any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules()):
        return "fsdp"
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return "zero3"
    return None


def distributed() -> bool:
    """Whether a default process group of more than one rank is set up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def root_gathered(module: nn.Module) -> Iterator[None]:
    """Gather the parameters that the FSDP root `module` itself holds (not its wrapped units') for the
    enclosed code, then shard them again. A module that is not an FSDP root is left as it is."""
    if isinstance(module, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(module, recurse=False, writeback=False):
            yield
    elif isinstance(module, FSDPModule):
        module.unshard()
        try:
            yield
        finally:
            module.reshard()
    else:
        yield
