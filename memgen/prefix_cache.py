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

A round's call passes a cache of its own (`PrefixCache.prepare`: the kept keys and values its rows see, read
when it begins, so that activation checkpointing's recomputation sees what the call saw and holds no more)
and an additive 4D mask (`prefix_mask`) to the weaver's decoder forward.
`MemGenModel` uses the cache where it gives the rounds' result (`MemGenModel._prefix_cache`); within
`rereading_prefixes()` it never does (a baseline for the benchmarks, or a check).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_layers import GradientCheckpointingLayer

from memgen.modes import checkpointed


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


def cache_survives_checkpointing(decoder: nn.Module) -> bool:
    """Whether the calls of `decoder` can keep a `PrefixCache` under its activation checkpointing (true without
    any): its checkpointed layers are transformers' `GradientCheckpointingLayer`s that can be told to keep a cache
    (5.23's can; 5.4's drop it) and recompute without reentrancy (with it, the first forward runs without
    autograd, so the kept keys and values would carry no gradient to the earlier rounds). Torch's own checkpoint
    wrapper (FSDP's `apply_activation_checkpointing`) cannot be told: no."""
    for module in decoder.modules():
        if type(module).__name__ == "CheckpointWrapper":
            return False
        if checkpointed(module):
            recompute = getattr(module, "_gradient_checkpointing_func", None)
            told = hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")
            reentrant = not isinstance(recompute, functools.partial) \
                or recompute.keywords.get("use_reentrant") is not False
            if not told or reentrant:
                return False
    return True


@contextlib.contextmanager
def kept_under_checkpointing(decoder: nn.Module) -> Iterator[None]:
    """Within: `decoder`'s checkpointed layers keep the cache they are passed, as the layers that only read one
    do (a call's `_Call` reads kept tensors that no later call changes, so the recomputation computes the same)."""
    layers = [module for module in decoder.modules() if checkpointed(module)]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # the class's False again


class _CallLayer(CacheLayerMixin):
    """One decoder layer in one call: the call's rows' kept keys and values [G, H, visible, D] (None when it sees
    none), read when the call began, and the call's own new ones. A recomputation of the call (activation
    checkpointing's backward) sees the same, and holds only what the call reads."""

    def __init__(self, past_keys: torch.Tensor | None, past_values: torch.Tensor | None, rows: torch.Tensor,
                 visible: int) -> None:
        super().__init__()
        self.past_keys, self.past_values, self.rows, self.visible = past_keys, past_values, rows, visible
        self.new_keys = self.new_values = None
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate: the kept tensors are `PrefixCache`'s."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """The call's rows' kept slots [0, visible) then the call's own items, [G, H, visible + T, D]."""
        self.new_keys, self.new_values = key_states, value_states
        if self.past_keys is None:
            return key_states, value_states
        return torch.cat([self.past_keys, key_states], 2), torch.cat([self.past_values, value_states], 2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.visible + query_length, 0

    def get_seq_length(self) -> int:
        return self.visible

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # get_max_length's name before transformers 5.13
        return -1


class _Call(Cache):
    """What one weaver call passes as its key/value cache (`PrefixCache.prepare`)."""

    def __init__(self, layers: list[_CallLayer]) -> None:
        super().__init__(layers=layers)


class PrefixCache:
    """Kept weaver keys and values of `batch` stream rows of up to `slots` items, for `num_layers` layers: every
    layer's in one tensor [B, slots, layers, H, D] (slot-major, so that a call's items index by (row, slot); the
    layers together, so that a round gathers and keeps them in one operation each, not one per layer), replaced,
    never written in place. `seen[b]` (device int64) counts row b's kept items: its stream items [0, seen[b])."""

    def __init__(self, num_layers: int, batch: int, slots: int, device: torch.device) -> None:
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)
        self.slots, self.num_layers = slots, num_layers
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def prepare(self, rows: torch.Tensor) -> tuple[_Call, int]:
        """The cache of a call for stream rows `rows` (device int64 [G]), and the kept slots it sees (the most any of
        its rows has)."""
        visible = int(self.seen[rows].max())
        if visible == 0 or self.keys is None:
            return _Call([_CallLayer(None, None, rows, visible) for _ in range(self.num_layers)]), visible
        keys, values = self.keys[rows, :visible], self.values[rows, :visible]  # [G, visible, layers, H, D]
        return _Call([_CallLayer(keys[:, :, i].transpose(1, 2), values[:, :, i].transpose(1, 2), rows, visible)
                      for i in range(self.num_layers)]), visible

    def keep(self, call: _Call, items: torch.Tensor, ends: torch.Tensor) -> None:
        """After `call`: keep its items marked in `items` (bool [G, T], each row's items those that follow its kept
        ones, in order) and count each row as having seen its first ends[g] stream items. Out of place, so that
        autograd keeps what earlier calls read."""
        rows, columns = items.nonzero(as_tuple=True)
        stream_rows = call.layers[0].rows
        slots = self.seen[stream_rows][rows] + (items.long().cumsum(1) - 1)[rows, columns]
        # [G, layers, H, T, D] -> the kept items [N, layers, H, D]
        new_keys = torch.stack([layer.new_keys for layer in call.layers], 1)[rows, :, :, columns]
        new_values = torch.stack([layer.new_values for layer in call.layers], 1)[rows, :, :, columns]
        for layer in call.layers:
            layer.new_keys = layer.new_values = None
        if self.keys is None:
            batch = self.seen.shape[0]
            self.keys = new_keys.new_zeros(batch, self.slots, *new_keys.shape[1:])
            self.values = new_values.new_zeros(batch, self.slots, *new_values.shape[1:])
        self.keys = self.keys.index_put((stream_rows[rows], slots), new_keys)
        self.values = self.values.index_put((stream_rows[rows], slots), new_values)
        self.seen = self.seen.index_put((stream_rows,), ends)


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
