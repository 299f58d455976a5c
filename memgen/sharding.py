"""Sharded models (FSDP, DeepSpeed ZeRO-3): how memgen recognises them, and their parameters gathered
for decoding.

Under FSDP each wrapped unit (typically a decoder layer) gathers its parameters in its forward, so
the engine's decoder calls work as they are, provided every rank makes the same calls
(`MemGenModel.generate(synced_ranks=...)`). The root's own parameters (embeddings, LM head, the
weaver's projections and queries, the trigger's head) are read directly by the engine, outside any
forward, so they are gathered once for the whole call.

Under DeepSpeed ZeRO-3 the engine decodes with every parameter gathered whole on each rank and
ZeRO-3's per-module hooks lifted (`gathered_for_decoding`): the hooks would gather and release each
module's shards around every one of the engine's many small calls, and the engine reads tables
outside any forward. Decoding then makes no collective calls, so ranks need not keep in step; it
holds one whole copy of the model per rank while it runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.tensor import DTensor


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


def ranks_max(values: list[int], device: torch.device) -> list[int]:
    """Each value's maximum over the ranks of the default process group (one all-reduce, on `device`
    under NCCL, on the CPU otherwise). Every rank must pass as many values."""
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    votes = torch.tensor(values, dtype=torch.int64, device=where)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return votes.tolist()


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


_DECODABLE: set[int] = set()  # ids of the modules of the ZeRO-3 engines inside `gathered_for_decoding`


def zero3_decodable(model: nn.Module) -> bool:
    """Whether `model` is inside `gathered_for_decoding` of its ZeRO-3 engine: its parameters whole and
    ZeRO-3's hooks lifted (parameters merely gathered would be released again by the next module call)."""
    return id(model) in _DECODABLE


@contextlib.contextmanager
def gathered_for_decoding(wrapped: Any) -> Iterator[None]:
    """Make a sharded model decodable by `generate` for the enclosed code. `wrapped`: what the trainer
    holds (`Trainer.model_wrapped`): a DeepSpeed engine, an FSDP wrapper, or the model itself.

    ZeRO-3: every parameter is gathered whole on each rank and ZeRO-3's module hooks are lifted, then
    restored and the parameters partitioned again (DeepSpeed's `unwrap_model_for_generation`). FSDP:
    the root's own parameters are gathered (`root_gathered`). Anything else is left as it is."""
    if sharding_of(wrapped) == "zero3":
        if getattr(wrapped, "optimizer", None) is None:
            raise ValueError("a ZeRO-3-partitioned model is decoded through its DeepSpeed engine (the object "
                             "deepspeed.initialize returns, Trainer.model_wrapped), which owns its hooks; got "
                             f"{type(wrapped).__name__}")
        from deepspeed.runtime.zero import unwrap_model_for_generation

        modules = {id(m) for m in wrapped.modules()}
        with unwrap_model_for_generation(wrapped):
            _DECODABLE.update(modules)
            try:
                yield
            finally:
                _DECODABLE.difference_update(modules)
    else:
        with root_gathered(wrapped):
            yield


@contextlib.contextmanager
def parameters_gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """The ZeRO-3-partitioned ones of `params` gathered whole, read-only, for the enclosed code; other
    parameters are left as they are. Under ZeRO-3 it is a collective: every rank must enter it."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    from deepspeed.runtime.zero import GatheredParameters

    with GatheredParameters(partitioned, modifier_rank=None):
        yield


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` whole: an FSDP2 shard (DTensor) gathered, a collective every rank must make; others as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
