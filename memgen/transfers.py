"""Small tensors between the host and an accelerator, several in one copy.

The engine keeps its books (rows, counts, cache lengths) on the host, so that sizing a call never waits
on the device, and sends the few small tensors a call needs to the device as it makes the call; once a
step it fetches the step's results (tokens, finished flags, decisions). Each copy costs a host operation
and a copy's launch, a fixed cost of every decode step; this module packs the tensors of one transfer
into one buffer, moves it in one copy and hands back views of it. The tensors are packed by decreasing
element size, so that each view starts at a multiple of its own element size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(host: Sequence[torch.Tensor], device: torch.device | str, pin: bool = True) -> list[torch.Tensor]:
    """`host` tensors on `device`, of their own dtypes and shapes, in one copy that does not make the host wait.

    Their bytes are packed into one buffer (pinned: a copy from pageable memory would make the host wait for
    the stream's queued work) and copied at once; the results are views of the copied buffer, so the device
    runs nothing but the copy.

    pin: whether the buffer is page-locked; False only where nothing can pin memory (a CPU-only torch).
    """
    if not host:
        return []
    order, flat = _bytes(host)
    packed = torch.empty(sum(part.numel() for part in flat), dtype=torch.uint8, pin_memory=pin)
    torch.cat(flat, out=packed)
    return _views(packed.to(device, non_blocking=True), host, order, flat)


def to_host(device: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`device` tensors on the host, of their own dtypes and shapes, in one copy (which waits for them): one
    kernel packs their bytes on the device, and the results are views of the copied buffer."""
    if not device:
        return []
    order, flat = _bytes(device)
    return _views(torch.cat(flat).cpu(), device, order, flat)


def _bytes(tensors: Sequence[torch.Tensor]) -> tuple[list[int], list[torch.Tensor]]:
    """The packing order (by decreasing element size; ties keep their order) and each tensor's bytes in it."""
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())
    return order, [tensors[i].contiguous().view(-1).view(torch.uint8) for i in order]


def _views(buffer: torch.Tensor, tensors: Sequence[torch.Tensor], order: list[int],
           flat: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of the packed `buffer` shaped and typed as `tensors`, in their own order."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    start = 0
    for i, part in zip(order, flat):
        out[i] = buffer[start:start + part.numel()].view(tensors[i].dtype).view(tensors[i].shape)
        start += part.numel()
    return out
