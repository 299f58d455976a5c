"""Single decoder calls of the generation engine, set up to be timed on their own.

The benchmark scripts under `benchmarks/` that cost a weaving step piece by piece (`call_costs.py`,
`weaving_floor.py`) time the engine's ragged decoders (`memgen.generation._RaggedDecoder`) one call
at a time. Each call here feeds random items to cache rows that already hold `PREFIX` items (a row
some way into its answer) and leaves the cache lengths as they were, so every round times the same
call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from memgen.generation import _RaggedDecoder
from memgen.layer_stack import input_device
from memgen.ops import pack_ragged

PREFIX = 100  # items each cache row holds before the timed calls


def packed_items(decoder: _RaggedDecoder, rows: torch.Tensor, width: int | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A packed call feeding `width` random items (an int, or host int32 per row) to each of cache rows `rows`
    (host int64; repeats: one batch row each), after what each row has read."""
    device = decoder.device
    stream = torch.randn(decoder.lengths.shape[0], decoder.capacity + 1, decoder.width, device=device,
                         generator=torch.Generator(device).manual_seed(0)).to(decoder.dtype) * 0.02
    lengths = decoder.lengths[rows]
    pending = torch.as_tensor(width, dtype=torch.int32).expand(rows.shape[0])
    return pack_ragged(stream, rows.to(device), lengths.to(device), pending.to(device), int(pending.max()), None,
                       decoder.capacity, int((lengths + pending).max()))


def prefilled_decoder(model, adapter: str | None, batch: int, capacity: int,
                      blocks: tuple[str, ...] = ()) -> _RaggedDecoder:
    """A ragged decoder over `model` (through `adapter`, or the bare base) whose cache rows have read PREFIX
    random items, less 0 to 7 (row r: r mod 8): a batch's rows are seldom equally long, and a one-item call
    over equally long rows runs without a mask. `blocks` as `_RaggedDecoder`'s."""
    device = input_device(model)
    decoder = _RaggedDecoder(model, adapter, batch, capacity, device, blocks)
    rows = torch.arange(decoder.lengths.shape[0])
    prefix = (PREFIX - rows % 8).to(torch.int32)
    with torch.no_grad():
        decoder.run(rows.shape[0], packed_items(decoder, rows, prefix), rows, prefix)
    return decoder


def repeatable_call(decoder: _RaggedDecoder, rows: torch.Tensor, width: int,
                    starts: tuple[int, ...] | None = None) -> Callable[[], None]:
    """A call feeding `width` items to each of cache rows `rows` (host int64; repeats: one batch row per item)
    that leaves the cache lengths as they are; `starts` as `_RaggedDecoder.run`'s."""
    packed, rows_device = packed_items(decoder, rows, width), rows.to(decoder.device)
    advance = rows.unique()
    unchanged = torch.zeros(advance.shape[0], dtype=torch.int32)

    @torch.no_grad()
    def run() -> None:
        decoder.run(rows_device, packed, advance, unchanged, starts)

    return run
