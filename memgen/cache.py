"""A per-row (ragged) KV cache for Hugging Face decoders.

Each layer keeps preallocated buffers [B, H, capacity + 1, D]. A call writes each row's new items
at that row's own slots (`memgen.ops.write_kv`), so an insertion of K latents in one row adds no
cache entries to the others. The caller packs the call with `memgen.ops.pack_step` or
`pack_ragged`, which give the explicit position ids, the write slots and the additive 4D mask
over the first `visible` slots; attention then reads only those slots. Padding items write the
scratch slot `capacity`, which no mask exposes. With this layout a row's logits equal those of
the row run alone (DESIGN.md section 3). A call whose batch rows map to cache rows by index gets
each batch row's copy of its cache row, or (`prepare(..., by_row=True)`) every cache row as it is,
for an attention that reads each item's row itself (`memgen.attention`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from memgen.ops import write_kv


class _Call:
    """The current call: its rows (device int64 [G], or an int n: the first n rows in order), write slots
    [G, T], mask width, and whether its attention reads every row's cache by row (`memgen.attention`)."""

    rows: torch.Tensor | int = 0
    slots: torch.Tensor
    visible: int
    by_row: bool = False


class RaggedLayer(CacheLayerMixin):
    """One decoder layer's buffers, written at per-row slots."""

    def __init__(self, batch: int, capacity: int, call: _Call, all_rows: torch.Tensor) -> None:
        super().__init__()
        self.batch, self.capacity, self.call, self.all_rows = batch, capacity, call, all_rows

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (self.batch, key_states.shape[1], self.capacity, key_states.shape[-1])
        self.keys = key_states.new_zeros(shape)
        self.values = value_states.new_zeros(shape[:3] + (value_states.shape[-1],))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        call = self.call
        if isinstance(call.rows, int):  # a leading range of rows: views, no copy
            write_kv(self.keys, self.values, self.all_rows[: call.rows], call.slots, key_states, value_states)
            return self.keys[: call.rows, :, : call.visible], self.values[: call.rows, :, : call.visible]
        write_kv(self.keys, self.values, call.rows, call.slots, key_states, value_states)
        keys, values = self.keys[:, :, : call.visible], self.values[:, :, : call.visible]
        if call.by_row:  # every cache row, viewed: the attention picks each item's row
            return keys, values
        return keys.index_select(0, call.rows), values.index_select(0, call.rows)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.call.visible, 0

    def get_seq_length(self) -> int:
        raise RuntimeError("RaggedCache has per-row lengths: pass explicit position_ids")

    def get_max_length(self) -> int:
        return self.capacity

    def get_max_cache_shape(self) -> int:  # get_max_length's name before transformers 5.13
        return self.capacity


class RaggedCache(Cache):
    """Per-row KV buffers for `num_layers` layers; `lengths[b]` counts row b's valid items.

    The lengths live on the host (an int32 CPU tensor): the caller sizes every ragged call from
    them, so keeping them there costs no synchronisation.
    """

    def __init__(self, num_layers: int, batch: int, capacity: int, device: torch.device) -> None:
        self._call = _Call()
        all_rows = torch.arange(batch, device=device)
        super().__init__(layers=[RaggedLayer(batch, capacity + 1, self._call, all_rows) for _ in range(num_layers)])
        self.lengths = torch.zeros(batch, dtype=torch.int32)

    def prepare(self, rows: torch.Tensor | int, slots: torch.Tensor, visible: int, by_row: bool = False) -> None:
        """Set up the next forward: rows [G] on the device (or an int n: the first n rows, in order), write
        slots [G, T], mask width; by_row: the layers return every cache row's keys and values, for an attention
        that reads each item's row itself (`memgen.attention.ragged_attention`)."""
        call = self._call
        call.rows, call.slots, call.visible, call.by_row = rows, slots, visible, by_row
