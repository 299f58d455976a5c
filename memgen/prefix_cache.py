"""The training forward's weaver cache across rounds of points: each stream item through the weaver once.

The training forward weaves in rounds (round r: every row's r-th point), and a weave reads the row's
stream prefix, which holds the latents of the row's earlier weaves, so the rounds run one after another.
Without a cache each round re-reads the whole prefix: for a row with its prompt point and five inference
points about 3.5 times the row in weaver items. `PrefixCache` keeps, per row, the keys and values of the
stream items the weaver has read (slot s of a row: its stream item s, so a row's slots [0, seen) are
all valid), so a round reads only the items since the row's previous weave, then the K queries, whose
keys and values are not kept. The kept tensors stay in the autograd graph: a later round's gradient
reaches the earlier rounds through them, as it does through their recomputation without the cache. The
result is the rounds' result (`tests/test_prefix_cache.py`).

A round's call passes the cache and an additive 4D mask (`prefix_mask`) to the weaver's decoder forward.
`MemGenModel` uses the cache where it gives the rounds' result (`MemGenModel._prefix_cache`); within
`rereading_prefixes()` it never does (a baseline for the benchmarks, or a check).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


_state = threading.local()


@contextlib.contextmanager
def rereading_prefixes() -> Iterator[None]:
    """Within (in this thread): the training forward re-reads each row's whole prefix at every weave."""
    previous = enabled()
    _state.enabled = False
    try:
        yield
    finally:
        _state.enabled = previous


def enabled() -> bool:
    """Whether the training forward may keep the weaver's keys and values across rounds here."""
    return getattr(_state, "enabled", True)


class _PrefixLayer(CacheLayerMixin):
    """One decoder layer's kept keys and values, [B, slots, H, D] (slot-major, so that a call's new items index
    by (row, slot)), and the current call's new ones."""

    def __init__(self, cache: PrefixCache) -> None:
        super().__init__()
        self.cache = cache
        self.keys = self.values = None
        self.new_keys = self.new_values = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, slots = self.cache.seen.shape[0], self.cache.slots
        self.keys = key_states.new_zeros(batch, slots, key_states.shape[1], key_states.shape[-1])
        self.values = value_states.new_zeros(batch, slots, value_states.shape[1], value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """The call's rows' kept slots [0, visible) then the call's own items, [G, H, visible + T, D]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, visible = self.cache.rows, self.cache.visible
        self.new_keys, self.new_values = key_states, value_states
        past_keys = self.keys[rows, :visible].transpose(1, 2)
        past_values = self.values[rows, :visible].transpose(1, 2)
        return torch.cat([past_keys, key_states], 2), torch.cat([past_values, value_states], 2)

    def keep(self, rows: torch.Tensor, columns: torch.Tensor, slots: torch.Tensor) -> None:
        """Keep the call's items at (rows[n], columns[n]) in slots[n] of those rows; out of place, for autograd."""
        new_keys = self.new_keys[rows, :, columns]  # [N, H, D]
        new_values = self.new_values[rows, :, columns]
        self.keys = self.keys.index_put((self.cache.rows[rows], slots), new_keys.to(self.keys.dtype))
        self.values = self.values.index_put((self.cache.rows[rows], slots), new_values.to(self.values.dtype))
        self.new_keys = self.new_values = None

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.visible + query_length, 0

    def get_seq_length(self) -> int:
        return self.cache.visible

    def get_max_length(self) -> int:
        return self.cache.slots

    def get_max_cache_shape(self) -> int:  # get_max_length's name before transformers 5.13
        return self.cache.slots


class PrefixCache(Cache):
    """Kept weaver keys and values of `batch` stream rows of up to `slots` items, for `num_layers` layers.
    `seen[b]` (device int64) counts row b's kept items: its stream items [0, seen[b])."""

    def __init__(self, num_layers: int, batch: int, slots: int, device: torch.device) -> None:
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)
        self.slots = slots
        self.rows = torch.zeros(0, dtype=torch.long, device=device)
        self.visible = 0
        super().__init__(layers=[_PrefixLayer(self) for _ in range(num_layers)])

    def prepare(self, rows: torch.Tensor) -> int:
        """Set up a call for stream rows `rows` (device int64 [G]); returns the kept slots it sees (the most any
        of its rows has)."""
        self.rows = rows
        self.visible = int(self.seen[rows].max())
        return self.visible

    def keep(self, items: torch.Tensor, ends: torch.Tensor) -> None:
        """After the call: keep its items marked in `items` (bool [G, T], each row's items those that follow its
        kept ones, in order) and count each row as having seen its first ends[g] stream items."""
        rows, columns = items.nonzero(as_tuple=True)
        slots = self.seen[self.rows][rows] + (items.long().cumsum(1) - 1)[rows, columns]
        for layer in self.layers:
            if layer.is_initialized:
                layer.keep(rows, columns, slots)
        self.seen = self.seen.index_put((self.rows,), ends)


def prefix_mask(seen: torch.Tensor, visible: int, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask [G, 1, T, visible + T] of a call whose rows have kept seen[g] items (device int64 [G]) and
    read items T (bool valid [G, T]: real ones; the others are padding): an item sees its row's kept slots and
    the call's real items up to itself; a padding item sees itself only (its output and keys are not used)."""
    groups, width = valid.shape
    device = valid.device
    kept = torch.arange(visible, device=device)[None, :] < seen[:, None]  # [G, visible]
    order = torch.arange(width, device=device)
    causal = order[None, :] <= order[:, None]  # [T, T]: item i sees item j <= i
    own = causal[None] & valid[:, None, :]  # [G, T, T]
    own = own | torch.eye(width, dtype=torch.bool, device=device)[None]
    sees = torch.cat([kept[:, None, :].expand(groups, width, visible) & valid[:, :, None], own], 2)
    mask = torch.zeros(sees.shape, dtype=dtype, device=device).masked_fill_(~sees, torch.finfo(dtype).min)
    return mask[:, None]
