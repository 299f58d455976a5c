"""Host tensors to an accelerator in one asynchronous copy.

The engine keeps its books (rows, counts, cache lengths) on the host, so that sizing a call never waits
on the device, and sends the few small tensors a call needs to the device as it makes the call. Each
copy costs a host operation and a copy's launch, a fixed cost of every decode step; this module packs
the tensors of one call into one pinned buffer and sends it in one copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(host: Sequence[torch.Tensor], device: torch.device | str, pin: bool = True) -> list[torch.Tensor]:
    """`host` tensors on `device`, of their own dtypes and shapes, in one copy that does not make the host wait.

    Their bytes are packed into one buffer (pinned: a copy from pageable memory would make the host wait for
    the stream's queued work) and copied at once; the results are views of the copied buffer, so the device
    runs nothing but the copy. The tensors are packed by decreasing element size, so that each view starts at a
    multiple of its own element size.

    pin: whether the buffer is page-locked; False only where nothing can pin memory (a CPU-only torch).
    """
    if not host:
        return []
    order = sorted(range(len(host)), key=lambda i: -host[i].element_size())  # stable: ties keep their order
    flat = [host[i].contiguous().view(-1).view(torch.uint8) for i in order]
    sizes = [part.numel() for part in flat]
    packed = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=pin)
    torch.cat(flat, out=packed)
    on_device = packed.to(device, non_blocking=True)
    out: list[torch.Tensor | None] = [None] * len(host)
    start = 0
    for i, size in zip(order, sizes):
        out[i] = on_device[start:start + size].view(host[i].dtype).view(host[i].shape)
        start += size
    return out
