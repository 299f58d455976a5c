"""A per-row (ragged) KV cache for Hugging Face decoders.

Each layer keeps preallocated buffers [B, H, S, D]. A call writes each row's new items at that
row's own slots (`RaggedCache.begin_step`), so an insertion of K latents in one row adds no cache
entries to the others. The caller drives the decoder with explicit position ids and the additive
4D mask built by `begin_step` from the per-row lengths; padding items of a step write into a
scratch slot that no mask ever exposes. With this layout a row's logits equal those of the row
run alone (DESIGN.md section 3).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _Slots:
    """Where the current call writes: rows [G] of the buffers and slots [G, T] within them."""

    rows: torch.Tensor
    slots: torch.Tensor


class RaggedLayer(CacheLayerMixin):
    """One decoder layer's buffers, written at per-row slots."""

    def __init__(self, batch: int, capacity: int, where: _Slots) -> None:
        super().__init__()
        self.batch, self.capacity, self.where = batch, capacity, where

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (self.batch, key_states.shape[1], self.capacity, key_states.shape[-1])
        self.keys = key_states.new_zeros(shape)
        self.values = value_states.new_zeros(shape[:3] + (value_states.shape[-1],))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows = self.where.rows[:, None].expand_as(self.where.slots)
        self.keys[rows, :, self.where.slots] = key_states.transpose(1, 2)
        self.values[rows, :, self.where.slots] = value_states.transpose(1, 2)
        if self.where.rows.shape[0] == self.batch:
            return self.keys, self.values
        return self.keys[self.where.rows], self.values[self.where.rows]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.capacity, 0

    def get_seq_length(self) -> int:
        raise RuntimeError("RaggedCache has per-row lengths: pass explicit position_ids")

    def get_max_length(self) -> int:
        return self.capacity


class RaggedCache(Cache):
    """Per-row KV buffers for `num_layers` layers; `lengths[b]` counts row b's valid items.

    The lengths live on the host: the caller sizes every ragged call from them, so keeping them
    there costs no synchronisation. Slot `capacity` is scratch: padding items write there, and
    no mask exposes it.
    """

    def __init__(self, num_layers: int, batch: int, capacity: int, device: torch.device) -> None:
        self._where = _Slots()
        super().__init__(layers=[RaggedLayer(batch, capacity + 1, self._where) for _ in range(num_layers)])
        self.capacity, self.device = capacity, device
        self.lengths = [0] * batch

    def begin_step(self, rows: list[int], n_items: list[int], width: int,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepare a call that feeds `n_items[g]` real items (then padding, up to `width`) to row `rows[g]`.

        Returns (position_ids [G, width], additive attention mask [G, 1, width, capacity + 1]). Item t
        of row g sits at slot lengths + t and position lengths + t, and sees the row's slots up to
        its own. Call `end_step` after the forward to make the items part of the rows.
        """
        device = self.device
        start = torch.tensor([self.lengths[r] for r in rows], device=device)
        n_t = torch.tensor(n_items, device=device)
        t = torch.arange(width, device=device)
        real = t[None, :] < n_t[:, None]
        slots = torch.where(real, start[:, None] + t[None, :], self.capacity)
        self._where.rows, self._where.slots = torch.tensor(rows, device=device), slots
        visible = start[:, None] + torch.minimum(t[None, :] + 1, n_t[:, None]).clamp(min=1)
        keys = torch.arange(self.capacity + 1, device=device)
        allowed = keys[None, None, :] < visible[:, :, None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return slots.clamp(max=self.capacity - 1), mask[:, None]

    @property
    def write_slots(self) -> torch.Tensor:
        """The slots [G, T] the current call writes (padding items: the scratch slot `capacity`)."""
        return self._where.slots

    def end_step(self, rows: list[int], n_items: list[int]) -> None:
        for r, n in zip(rows, n_items):
            self.lengths[r] += n

    def rollback(self, rows: list[int], lengths: list[int]) -> None:
        """Forget items past `lengths` (transient queries): their slots are overwritten later."""
        for r, n in zip(rows, lengths):
            self.lengths[r] = n
