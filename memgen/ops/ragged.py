"""Ragged decoder steps: latent-token injection and the batched weaver forward's packing.

A ragged call feeds row g of a decoder G-row batch its own number of new items, written at that
row's own cache slots. Three ops build and store such calls (DESIGN.md section 2):

- `pack_step` (latent-token injection): each row's pending token (looked up in the embedding
  table), then `latents[g, :n_latents[g]]`: the reasoner's whole decode step in one tensor;
- `pack_ragged` (batched weaver forward): the stream items row g's cache has not seen,
  `stream[rows[g], lengths[g] : lengths[g] + pending[g]]`, then the K queries (if given) for
  every row; also the prompt prefill (without queries);
- `write_kv`: `keys[rows[g], :, slots[g, t]] = new_keys[g, :, t]` (and values), the cache
  update of a ragged call.

Both packing ops return (items [G, W, d], position_ids int64[G, W], slots int64[G, W], additive
mask [G, 1, W, visible]). Row g's real items are block A's first n_a columns then block B's
first n_b columns; they take slots and positions lengths[g], lengths[g] + 1, ... and item at
slot s attends to slots [0, s]. Padding items are zeros, write the scratch slot `capacity` (no
mask exposes it) and attend to the row's real slots (at least slot 0, keeping softmax finite).
`visible` is the mask width: the caller attends over cache slots [0, visible) only.
"""

from __future__ import annotations

import torch

from memgen.ops import _native, selection
from memgen.ops._checks import FLOAT_DTYPES, describe

def _expect(cond: bool, op: str, message: str) -> None:
    if not cond:
        raise ValueError(f"memgen::{op}: {message}")


def _int_vector(t, name: str, dtype: torch.dtype, groups: int, device: torch.device, op: str) -> None:
    _expect(isinstance(t, torch.Tensor) and t.dtype == dtype and tuple(t.shape) == (groups,) and t.device == device,
            op, f"argument '{name}' must be {str(dtype).removeprefix('torch.')}[{groups}] on {device}, got {describe(t)}")


def _check_sizes(capacity: int, visible: int, op: str) -> None:
    _expect(capacity >= 1, op, f"argument 'capacity' must be >= 1, got {capacity}")
    _expect(1 <= visible <= capacity, op, f"argument 'visible' must lie in [1, capacity = {capacity}], got {visible}")


def _layout(lengths: torch.Tensor, n_a: torch.Tensor, a_width: int, n_b: torch.Tensor, b_width: int,
            capacity: int, visible: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(real [G, W], item index within its block [G, W], positions, slots, mask) of a ragged call."""
    lengths, n_a, n_b = lengths.long()[:, None], n_a.long()[:, None], n_b.long()[:, None]
    col = torch.arange(a_width + b_width, device=lengths.device)[None, :]
    in_a = col < a_width
    real = torch.where(in_a, col < n_a, col - a_width < n_b)
    order = torch.where(in_a, col, n_a + col - a_width)  # rank among the row's real items
    end = lengths + n_a + n_b
    slots = torch.where(real, lengths + order, capacity)
    positions = torch.where(real, lengths + order, (end - 1).clamp(min=0))
    sees = torch.where(real, lengths + order + 1, end.clamp(min=1))
    keys = torch.arange(visible, device=lengths.device)
    mask = torch.zeros(*real.shape, visible, dtype=dtype, device=lengths.device)
    mask.masked_fill_(keys >= sees[..., None], torch.finfo(dtype).min)
    return real, torch.where(in_a, col, col - a_width).expand_as(real), positions, slots, mask[:, None]


def _check_layout(lengths: torch.Tensor, n_a: torch.Tensor, a_width: int, n_b: torch.Tensor, b_width: int,
                  capacity: int, visible: int, op: str, a_name: str, b_name: str) -> None:
    """Every row's counts and end within bounds (host values: the torch path runs on any device)."""
    lengths_h, n_a_h, n_b_h = lengths.long().cpu(), n_a.long().cpu(), n_b.long().cpu()
    for name, counts, limit in ((a_name, n_a_h, a_width), (b_name, n_b_h, b_width)):
        bad = ((counts < 0) | (counts > limit)).nonzero()
        _expect(bad.numel() == 0, op, f"row {bad[0, 0].item() if bad.numel() else 0} has "
                f"{counts[bad[0, 0]].item() if bad.numel() else 0} {name} items, expected 0..{limit}")
    bad = (lengths_h < 0).nonzero()
    _expect(bad.numel() == 0, op, f"lengths[{bad[0, 0].item() if bad.numel() else 0}] must be >= 0")
    end = lengths_h + n_a_h + n_b_h
    if end.numel():
        _expect(int(end.max()) <= capacity, op, f"row {int(end.argmax())} would hold {int(end.max())} items, "
                f"past the cache capacity {capacity}")
        _expect(int(end.max()) <= visible, op, f"row {int(end.argmax())} would hold {int(end.max())} items, "
                f"past the mask width 'visible' = {visible}")


def pack_step_reference(tokens: torch.Tensor | None, embed_weight: torch.Tensor, latents: torch.Tensor | None,
                        n_latents: torch.Tensor | None, lengths: torch.Tensor, capacity: int,
                        visible: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch semantics of `pack_step` (the fallback and the test oracle)."""
    groups, device = lengths.shape[0], lengths.device
    a_width = 1 if tokens is not None else 0
    b_width = latents.shape[1] if latents is not None else 0
    n_a = torch.full((groups,), a_width, device=device)
    n_b = n_latents if latents is not None else torch.zeros(groups, dtype=torch.int32, device=device)
    real, index, positions, slots, mask = _layout(lengths, n_a, a_width, n_b, b_width, capacity, visible,
                                                  embed_weight.dtype)
    blocks = []
    if tokens is not None:
        blocks.append(embed_weight[tokens][:, None])
    if latents is not None:
        blocks.append(latents)
    items = torch.cat(blocks, 1) if blocks else embed_weight.new_zeros(groups, 0, embed_weight.shape[1])
    return items * real[..., None].to(items.dtype), positions, slots, mask


def pack_ragged_reference(stream: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor, pending: torch.Tensor,
                          width: int, queries: torch.Tensor | None, capacity: int,
                          visible: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch semantics of `pack_ragged` (the fallback and the test oracle)."""
    groups, device = rows.shape[0], rows.device
    b_width = queries.shape[0] if queries is not None else 0
    n_b = torch.full((groups,), b_width, device=device)
    real, index, positions, slots, mask = _layout(lengths, pending, width, n_b, b_width, capacity, visible,
                                                  stream.dtype)
    source = torch.where(real[:, :width], lengths.long()[:, None] + index[:, :width], 0)
    items = stream[rows[:, None], source] * real[:, :width, None].to(stream.dtype)
    if queries is not None:
        items = torch.cat([items, queries.expand(groups, b_width, queries.shape[1])], 1)
    return items, positions, slots, mask


def write_kv_reference(keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                       new_keys: torch.Tensor, new_values: torch.Tensor) -> None:
    """Plain PyTorch semantics of `write_kv`. Duplicate (row, slot) pairs (padding) keep one of their writes."""
    index = rows[:, None].expand_as(slots)
    keys[index, :, slots] = new_keys.transpose(1, 2)
    values[index, :, slots] = new_values.transpose(1, 2)


def _check_pack_step(tokens, embed_weight, latents, n_latents, lengths, capacity, visible) -> None:
    op = "pack_step"
    _expect(isinstance(lengths, torch.Tensor) and lengths.dim() == 1, op,
            f"argument 'lengths' must be int32[G], got {describe(lengths)}")
    groups, device = lengths.shape[0], lengths.device
    _int_vector(lengths, "lengths", torch.int32, groups, device, op)
    _expect(isinstance(embed_weight, torch.Tensor) and embed_weight.dim() == 2 and embed_weight.device == device, op,
            f"argument 'embed_weight' must be a float tensor [V, d] on {device}, got {describe(embed_weight)}")
    _expect(embed_weight.dtype in FLOAT_DTYPES, op,
            f"argument 'embed_weight' must be float32, bfloat16 or float16, got {describe(embed_weight)}")
    _expect(tokens is not None or latents is not None, op, "nothing to pack: pass 'tokens', 'latents' or both")
    _check_sizes(capacity, visible, op)
    if tokens is not None:
        _int_vector(tokens, "tokens", torch.int64, groups, device, op)
        bad = ((tokens < 0) | (tokens >= embed_weight.shape[0])).nonzero().cpu()
        _expect(bad.numel() == 0, op, f"row {bad[0, 0].item() if bad.numel() else 0} reads token items outside "
                "their source")
    if latents is not None:
        d = embed_weight.shape[1]
        _expect(isinstance(latents, torch.Tensor) and latents.dim() == 3 and latents.shape[0] == groups
                and latents.shape[2] == d and latents.dtype == embed_weight.dtype and latents.device == device, op,
                f"argument 'latents' must be {str(embed_weight.dtype).removeprefix('torch.')}[{groups}, K, {d}] "
                f"on {device}, got {describe(latents)}")
        _expect(n_latents is not None, op, "argument 'n_latents' (int32[G], latents per row) is required with 'latents'")
        _int_vector(n_latents, "n_latents", torch.int32, groups, device, op)
    else:
        _expect(n_latents is None, op, "argument 'n_latents' must be None without 'latents'")
    a_width = 1 if tokens is not None else 0
    b_width = latents.shape[1] if latents is not None else 0
    n_b = n_latents if latents is not None else torch.zeros(groups, dtype=torch.int32, device=device)
    _check_layout(lengths, torch.full((groups,), a_width), a_width, n_b, b_width, capacity, visible, op,
                  "token", "latent")


def _check_pack_ragged(stream, rows, lengths, pending, width, queries, capacity, visible) -> None:
    op = "pack_ragged"
    _expect(isinstance(rows, torch.Tensor) and rows.dim() == 1, op, f"argument 'rows' must be int64[G], got {describe(rows)}")
    groups, device = rows.shape[0], rows.device
    _int_vector(rows, "rows", torch.int64, groups, device, op)
    _int_vector(lengths, "lengths", torch.int32, groups, device, op)
    _int_vector(pending, "pending", torch.int32, groups, device, op)
    _expect(isinstance(stream, torch.Tensor) and stream.dim() == 3 and stream.device == device, op,
            f"argument 'stream' must be a float tensor [B, S, d] on {device}, got {describe(stream)}")
    _expect(stream.dtype in FLOAT_DTYPES, op, f"argument 'stream' must be float32, bfloat16 or float16, got {describe(stream)}")
    _expect(width >= 0, op, f"argument 'width' must be >= 0, got {width}")
    _check_sizes(capacity, visible, op)
    if queries is not None:
        d = stream.shape[2]
        _expect(isinstance(queries, torch.Tensor) and queries.dim() == 2 and queries.shape[1] == d
                and queries.dtype == stream.dtype and queries.device == device, op,
                f"argument 'queries' must be {str(stream.dtype).removeprefix('torch.')}[K, {d}] on {device}, "
                f"got {describe(queries)}")
    b_width = queries.shape[0] if queries is not None else 0
    _check_layout(lengths, pending, width, torch.full((groups,), b_width), b_width, capacity, visible, op,
                  "pending", "query")
    rows_h, lengths_h, pending_h = rows.cpu(), lengths.long().cpu(), pending.long().cpu()
    bad = ((rows_h < 0) | (rows_h >= stream.shape[0]) | ((pending_h > 0) & (lengths_h + pending_h > stream.shape[1]))).nonzero()
    _expect(bad.numel() == 0, op, f"row {bad[0, 0].item() if bad.numel() else 0} reads pending items outside their source")


def _check_write_kv(keys, values, rows, slots, new_keys, new_values) -> None:
    op = "write_kv"
    _expect(isinstance(rows, torch.Tensor) and rows.dim() == 1 and rows.dtype == torch.int64, op,
            f"argument 'rows' must be int64[G], got {describe(rows)}")
    groups, device = rows.shape[0], rows.device
    _expect(isinstance(slots, torch.Tensor) and slots.dim() == 2 and slots.shape[0] == groups
            and slots.dtype == torch.int64 and slots.device == device, op,
            f"argument 'slots' must be int64[{groups}, T] on {device}, got {describe(slots)}")
    for cache, update, cache_name, update_name in ((keys, new_keys, "keys", "new_keys"),
                                                   (values, new_values, "values", "new_values")):
        _expect(isinstance(cache, torch.Tensor) and cache.dim() == 4 and cache.is_contiguous() and cache.device == device,
                op, f"argument '{cache_name}' must be a contiguous [B, H, S, D] tensor on {device}, got {describe(cache)}")
        _expect(cache.dtype in FLOAT_DTYPES, op,
                f"argument '{cache_name}' must be float32, bfloat16 or float16, got {describe(cache)}")
        shape = (groups, cache.shape[1], slots.shape[1], cache.shape[3])
        _expect(isinstance(update, torch.Tensor) and tuple(update.shape) == shape and update.dtype == cache.dtype
                and update.device == device, op,
                f"argument '{update_name}' must be {str(cache.dtype).removeprefix('torch.')}{list(shape)} on {device}, "
                f"got {describe(update)}")
    _expect(keys.shape[0] == values.shape[0] and keys.shape[2] == values.shape[2], op,
            f"arguments 'keys' and 'values' must share B and S, got {describe(keys)} and {describe(values)}")
    rows_h, slots_h = rows.cpu(), slots.cpu()
    bad = ((rows_h < 0) | (rows_h >= keys.shape[0])).nonzero()
    _expect(bad.numel() == 0, op, f"rows[{bad[0, 0].item() if bad.numel() else 0}] is outside the cache's "
            f"{keys.shape[0]} rows")
    _expect(not ((slots_h < 0) | (slots_h >= keys.shape[2])).any(), op,
            f"a slot is outside the cache's {keys.shape[2]} slots")


def _device_type(t) -> str:
    return t.device.type if isinstance(t, torch.Tensor) else "cpu"


def pack_step(tokens: torch.Tensor | None, embed_weight: torch.Tensor, latents: torch.Tensor | None,
              n_latents: torch.Tensor | None, lengths: torch.Tensor, capacity: int, visible: int, *,
              backend_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack one reasoner step of a ragged batch: each row's pending token, then its latents.

    Args:
        tokens: int64[G] the token each row appends (None: latents only).
        embed_weight: float[V, d] the reasoner's input embedding table (also the items' and mask's dtype).
        latents: [G, K, d] woven latents (None: tokens only); n_latents: int32[G], 0..K of them are real per row.
        lengths: int32[G] each row's cache length before the step.
        capacity: real cache slots per row (slot `capacity` is scratch); visible: the mask width.

    Returns:
        items [G, W, d], position_ids int64[G, W], slots int64[G, W], mask [G, 1, W, visible] with W = (1 if
        tokens) + K; see the module docstring for the layout.
    """
    impl = selection.select("pack_step", _device_type(lengths), backend_name)
    if impl == "native":
        return tuple(torch.ops.memgen.pack_step.default(tokens, embed_weight, latents, n_latents, lengths, capacity,
                                                        visible))
    _check_pack_step(tokens, embed_weight, latents, n_latents, lengths, capacity, visible)
    return pack_step_reference(tokens, embed_weight, latents, n_latents, lengths, capacity, visible)


def pack_ragged(stream: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor, pending: torch.Tensor, width: int,
                queries: torch.Tensor | None, capacity: int, visible: int, *,
                backend_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack, for rows `rows` of `stream`, the items their cache has not seen, then the queries.

    Args:
        stream: float[B, S, d] every row's stream of items (slot i of a row's cache holds its item i).
        rows: int64[G] which stream rows; lengths: int32[G] their cache lengths (the first unseen item);
        pending: int32[G] how many unseen items each row feeds, at most `width`.
        queries: float[K, d] appended to every row (None: none).
        capacity: real cache slots per row (slot `capacity` is scratch); visible: the mask width.

    Returns:
        items [G, width + K, d], position_ids, slots, mask as for `pack_step`. The queries' outputs are
        columns width .. width + K of every row.
    """
    impl = selection.select("pack_ragged", _device_type(rows), backend_name)
    if impl == "native":
        return tuple(torch.ops.memgen.pack_ragged.default(stream, rows, lengths, pending, width, queries, capacity,
                                                          visible))
    _check_pack_ragged(stream, rows, lengths, pending, width, queries, capacity, visible)
    return pack_ragged_reference(stream, rows, lengths, pending, width, queries, capacity, visible)


def write_kv(keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
             new_keys: torch.Tensor, new_values: torch.Tensor, *, backend_name: str | None = None) -> None:
    """Write a ragged call's keys and values at per-row cache slots, in place.

    keys/values: contiguous [B, H, S, D] caches; rows: int64[G]; slots: int64[G, T] (padding items write a
    scratch slot); new_keys/new_values: [G, H, T, D], any strides (as attention layers produce them).
    """
    impl = selection.select("write_kv", _device_type(rows), backend_name)
    if impl == "native":
        torch.ops.memgen.write_kv.default(keys, values, rows, slots, new_keys, new_values)
        return
    _check_write_kv(keys, values, rows, slots, new_keys, new_values)
    write_kv_reference(keys, values, rows, slots, new_keys, new_values)


if _native.load()[0]:

    @torch.library.register_fake("memgen::pack_step")
    def _pack_step_fake(tokens, embed_weight, latents, n_latents, lengths, capacity, visible):
        groups, d = lengths.shape[0], embed_weight.shape[1]
        width = (1 if tokens is not None else 0) + (latents.shape[1] if latents is not None else 0)
        return (embed_weight.new_empty(groups, width, d), lengths.new_empty(groups, width, dtype=torch.int64),
                lengths.new_empty(groups, width, dtype=torch.int64), embed_weight.new_empty(groups, 1, width, visible))

    @torch.library.register_fake("memgen::pack_ragged")
    def _pack_ragged_fake(stream, rows, lengths, pending, width, queries, capacity, visible):
        groups, d = rows.shape[0], stream.shape[2]
        cols = width + (queries.shape[0] if queries is not None else 0)
        return (stream.new_empty(groups, cols, d), rows.new_empty(groups, cols), rows.new_empty(groups, cols),
                stream.new_empty(groups, 1, cols, visible))

    @torch.library.register_fake("memgen::write_kv")
    def _write_kv_fake(keys, values, rows, slots, new_keys, new_values):
        return None
