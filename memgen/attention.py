"""Ragged attention: a call's items, one per batch row, attend to their rows' caches without a copy per item.

A ragged call laid out one item per batch row (`memgen.generation`'s `_Engine._call`) maps each item to
its cache row; plain attention then needs the keys and values as one batch row per item, a copy of
the row's whole cache for every item (`RaggedLayer`'s `index_select`). On a CPU that copy is most of
an item's cost in such a call. Here the items are grouped back by cache row, and each group's
queries attend to its row's cache at once:

- rows with one item: their queries attend to a view of the cache rows [lo, hi) that covers them
  (one query for each row of that range; the rows of the range the call does not read get a dummy
  query, whose output is dropped), so no key is copied;
- rows with several items: their rows' caches are gathered once per row (not per item), and their
  queries padded to the longest row's count.

Each group's mask rows are the items' own (the call's additive mask), so every item attends to
exactly what it would in the one-item-per-row layout: the result is that of `ragged_attention_reference`.
Grouped-query heads stay packed (the query heads of one key/value head ride along the query axis), so keys
and values are never repeated.

A call laid out one batch row per cache row (its items padded to the longest row's, `PaddedRows`) that
does not read the cache's leading rows in order, or reads several items a row, attends the same way: its
queries are placed at their rows within a range of cache rows that covers them (dummy queries elsewhere)
and attend to a view of that range, where plain attention would copy each row's cache (`index_select`)
and then repeat every key/value head for its query heads.

The engine selects this function through Hugging Face's `AttentionInterface` for those calls only
(`attention_implementation`); without a `ragged` argument it is SDPA attention. Its other calls run under
`mask_attention`: the model's own attention where that applies an additive 4D mask, else SDPA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

RAGGED_ATTENTION = "memgen_ragged"

# Attention implementations that apply a call's additive 4D mask as given. Flash attention reads a mask as a [B, L]
# padding mask and FlexAttention indexes it by its own shapes, so under those the engine's masks, which hide per-row
# cache slots, would be misread (`mask_attention` then picks SDPA, or eager).
MASK_ATTENTION = ("sdpa", "eager")


@dataclass
class _Group:
    """Rows whose items attend together: cache rows (a range (lo, hi) viewed in place, or device int64 [R]
    gathered), the call's items in it (device int64 [N]), each item's place in the group's padded
    [R * T] query axis (device int64 [N]) and that place as (row, column) (device int64 [N] each), T, the
    group's mask [R, 1, T * heads per key head, visible], and its query buffer (`_query_buffer`)."""

    rows: tuple[int, int] | torch.Tensor
    items: torch.Tensor
    places: torch.Tensor
    place_rows: torch.Tensor
    place_columns: torch.Tensor
    width: int
    mask: torch.Tensor
    buffer: list[torch.Tensor]

    def masked(self, mask: torch.Tensor, gqa: int) -> _Group:
        """The same group (and query buffer) under another of the call's masks [N, 1, 1, visible]."""
        return _Group(self.rows, self.items, self.places, self.place_rows, self.place_columns, self.width,
                      _group_mask(mask, self.items, self.places, self._n_rows(), self.width, gqa), self.buffer)

    def _n_rows(self) -> int:
        return self.rows[1] - self.rows[0] if isinstance(self.rows, tuple) else self.rows.shape[0]


class RaggedGroups:
    """How one call's items (one per batch row, each row's items consecutive) group by cache row.

    rows: host int64 [R] the call's distinct cache rows; counts: host int32 [R] their items, in the call's
    order; mask: the call's additive mask [N, 1, 1, visible] (device); gqa: query heads per key/value head;
    to_device: host tensors -> the same on the call's device (`_Engine.to_device`).
    """

    def __init__(self, rows: torch.Tensor, counts: torch.Tensor, mask: torch.Tensor, gqa: int, to_device) -> None:
        first = torch.cumsum(counts, 0) - counts
        self.n_items = int(counts.sum())
        self.gqa = gqa
        self.groups = []
        single = counts == 1
        if single.any():
            self.groups.append(self._singles(rows[single], first[single], mask, gqa, to_device))
        several = counts > 1
        if several.any():
            self.groups.append(self._several(rows[several], counts[several], first[several], mask, gqa, to_device))

    def masked(self, mask: torch.Tensor) -> RaggedGroups:
        """The same groups under another of the call's masks [N, 1, 1, visible] (a sliding window's)."""
        other = object.__new__(RaggedGroups)
        other.n_items, other.gqa = self.n_items, self.gqa
        other.groups = [group.masked(mask, self.gqa) for group in self.groups]
        return other

    @staticmethod
    def _singles(rows: torch.Tensor, items: torch.Tensor, mask: torch.Tensor, gqa: int, to_device) -> _Group:
        span = _covering_span(rows)
        if span is not None:
            places, n_rows = rows - span[0], span[1] - span[0]
        else:
            places, n_rows = torch.arange(rows.shape[0]), rows.shape[0]
        items_device, places_device, rows_device, columns = to_device(items, places, rows, torch.zeros_like(places))
        return _Group(span if span is not None else rows_device, items_device, places_device, places_device, columns,
                      1, _group_mask(mask, items_device, places_device, n_rows, 1, gqa), [])

    @staticmethod
    def _several(rows: torch.Tensor, counts: torch.Tensor, first: torch.Tensor, mask: torch.Tensor, gqa: int,
                 to_device) -> _Group:
        width = int(counts.max())
        real = (torch.arange(width) < counts[:, None]).nonzero()  # (group row, item) of every item
        items = first[real[:, 0]] + real[:, 1]
        places = real[:, 0] * width + real[:, 1]
        items_device, places_device, rows_device, place_rows, place_columns = to_device(
            items, places, rows, real[:, 0].contiguous(), real[:, 1].contiguous())
        return _Group(rows_device, items_device, places_device, place_rows, place_columns, width,
                      _group_mask(mask, items_device, places_device, rows.shape[0], width, gqa), [])


def _covering_span(rows: torch.Tensor) -> tuple[int, int] | None:
    """The range [lo, hi) of cache rows that covers `rows` (host int64, distinct), to view in place with at most one
    dummy query per row read; None where it would take more (the rows are gathered instead)."""
    lo, hi = int(rows.min()), int(rows.max()) + 1
    return (lo, hi) if hi - lo <= 2 * rows.shape[0] else None


def _keys_values(key: torch.Tensor, value: torch.Tensor,
                 rows: tuple[int, int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of cache rows `rows`: a range (lo, hi) viewed in place, or device int64 rows gathered."""
    if isinstance(rows, tuple):
        return key[rows[0]:rows[1]], value[rows[0]:rows[1]]
    return key.index_select(0, rows), value.index_select(0, rows)


def _query_buffer(holder: list[torch.Tensor], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A call's query buffer (in `holder`, shared by its masked twins), zeros where no query is: made by the call's
    first layer and reused by the rest. Each layer writes the same places, and its attention has read them before
    the next layer writes them again."""
    if not holder or holder[0].shape != shape or holder[0].dtype != like.dtype:
        holder[:] = [like.new_zeros(shape)]
    return holder[0]


class PaddedRows:
    """Where a call laid out one batch row per cache row (distinct rows, each with the same number T of items,
    padding included) reads: the range [lo, hi) of cache rows that covers them, viewed in place, with each batch
    row's place in it (device int64 [G]; None: the range is the rows in order); or, where that range would be
    more than twice as many rows, the rows themselves, gathered (`gathered`).

    rows: host int64 [G]; rows_device: the same on the device (None where they are the cache's first G rows);
    mask: the call's additive mask [G, 1, T, visible], laid out once per call for the packed query heads (so
    it is worth it while T * gqa stays under what repeating the keys and values would copy, `pays`); gqa:
    query heads per key/value head.
    """

    def __init__(self, rows: torch.Tensor, rows_device: torch.Tensor | None, mask: torch.Tensor, gqa: int) -> None:
        self.gqa = gqa
        self.span = _covering_span(rows)
        self.gathered = rows_device if self.span is None else None
        lo, hi = self.span or (0, 0)
        in_order = hi - lo == rows.shape[0] and bool((rows == torch.arange(lo, hi)).all())
        self.places = None if self.span is None or in_order else rows_device - lo
        self.mask = self._laid_out(mask)
        self.queries: list[torch.Tensor] = []  # the span's query buffer (`_query_buffer`)

    @staticmethod
    def pays(width: int, gqa: int, heads: int, head_dim: int) -> bool:
        """Whether a call of `width` items a row costs less memory this way: its mask per packed query head
        (width * gqa rows a batch row) against the copies plain attention makes of each row's keys and values
        repeated for its query heads (2 * heads * head_dim a slot). A long prompt's read stays plain."""
        return width * gqa <= 2 * heads * head_dim

    def masked(self, mask: torch.Tensor) -> PaddedRows:
        """The same rows under another of the call's masks [G, 1, T, visible] (a sliding window's)."""
        other = object.__new__(PaddedRows)
        other.gqa, other.gathered, other.span, other.places = self.gqa, self.gathered, self.span, self.places
        other.mask, other.queries = other._laid_out(mask), self.queries
        return other

    def _laid_out(self, mask: torch.Tensor) -> torch.Tensor:
        """mask [G, 1, T, visible] per packed query head, at each row's place in the span (dummy rows: finite)."""
        per_head = _per_head(mask, self.gqa)
        if self.places is None:
            return per_head
        spread = per_head.new_zeros((self.span[1] - self.span[0],) + per_head.shape[1:])
        spread[self.places] = per_head
        return spread


def _padded_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: PaddedRows,
                      scaling: float | None) -> torch.Tensor:
    """Attention of a `PaddedRows` call: query [G, H, T, D], key and value every cache row's [R, H_kv, visible, D];
    returns [G, T, H, D]. A key/value head's query heads ride along the query axis (T major), so keys and values
    are neither copied nor repeated unless the rows are gathered."""
    n, heads, width, dim = query.shape
    kv_heads = heads // rows.gqa
    by_head = query.view(n, kv_heads, rows.gqa, width, dim).transpose(2, 3)  # [G, H_kv, T, gqa, D]
    keys, values = _keys_values(key, value, rows.span or rows.gathered)
    if rows.places is None:
        queries = by_head.reshape(n, kv_heads, width * rows.gqa, dim)
    else:  # every row of the span gets a query; the rows the call does not read, zeros
        queries = _query_buffer(rows.queries, (keys.shape[0],) + by_head.shape[1:], query)
        queries[rows.places] = by_head
        queries = queries.view(keys.shape[0], kv_heads, width * rows.gqa, dim)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=rows.mask, scale=scaling)
    out = out.view(-1, kv_heads, width, rows.gqa, dim).permute(0, 2, 1, 3, 4)  # [rows, T, H_kv, gqa, D]
    out = out.index_select(0, rows.places) if rows.places is not None else out.contiguous()  # contiguous: views
    return out.view(n, width, heads, dim)


def _group_mask(mask: torch.Tensor, items: torch.Tensor, places: torch.Tensor, n_rows: int, width: int,
                gqa: int) -> torch.Tensor:
    """A group's mask [R, 1, T * gqa, visible] from the call's [N, 1, 1, visible]: each item's row at its place;
    dummy and padding queries see every slot (finite)."""
    group_mask = mask.new_zeros(n_rows * width, 1, mask.shape[-1])
    group_mask[places] = mask[items, :, 0]
    group_mask = group_mask.view(n_rows, width, 1, mask.shape[-1]).transpose(1, 2)
    return _per_head(group_mask, gqa)


def _per_head(mask: torch.Tensor, gqa: int) -> torch.Tensor:
    """A mask [R, 1, T, visible] for the packed query axis (a key/value head's query heads, T major): each of T's
    rows once per query head of a key/value head."""
    n, _, width, visible = mask.shape
    return mask[:, :, :, None].expand(n, 1, width, gqa, visible).reshape(n, 1, width * gqa, visible)


def ragged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     ragged: RaggedGroups | PaddedRows | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Hugging Face attention-interface function. With `ragged` groups: query [N, H, 1, D] (item n of the call in
    batch row n), key and value every cache row's [rows, H_kv, visible, D] (the mask is in `ragged`); returns
    [N, 1, H, D]. With `PaddedRows`: query [G, H, T, D], the same keys and values; returns [G, T, H, D].
    Without: SDPA attention."""
    if ragged is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if isinstance(ragged, PaddedRows):
        return _padded_attention(query, key, value, ragged, scaling), None
    heads, dim = query.shape[1], query.shape[-1]
    kv_heads = key.shape[1]
    gqa = heads // kv_heads
    flat = query[:, :, 0]
    out = None
    for group in ragged.groups:
        n_rows = group.mask.shape[0]
        shape = (n_rows, kv_heads, group.width, gqa, dim)  # the packed layout: a key head's query heads, T major
        queries = _query_buffer(group.buffer, shape, flat)  # zeros where no item is
        by_place = queries.permute(0, 2, 1, 3, 4)  # [R, T, H_kv, gqa, D], a view
        by_place[group.place_rows, group.place_columns] = flat.index_select(0, group.items).view(-1, kv_heads, gqa,
                                                                                               dim)
        keys, values = _keys_values(key, value, group.rows)
        result = F.scaled_dot_product_attention(queries.view(n_rows, kv_heads, group.width * gqa, dim), keys, values,
                                                attn_mask=group.mask, scale=scaling)
        if out is None:  # in the attention's dtype, which autocast may have lowered from the queries'
            out = result.new_empty(ragged.n_items, kv_heads, gqa, dim)
        out[group.items] = result.view(shape).permute(0, 2, 1, 3, 4)[group.place_rows, group.place_columns]
    return out.view(ragged.n_items, 1, heads, dim), None


def windowed(mask: torch.Tensor, positions: torch.Tensor, window: int) -> torch.Tensor:
    """A ragged call's additive mask [G, 1, W, visible] for sliding-window layers: an item at position p (positions:
    int64 [G, W]) also hides the cache slots at or before p - window. A row's slot s holds its item at position s,
    so the item sees the keys less than a window before it, as Hugging Face's sliding masks do."""
    slots = torch.arange(mask.shape[-1], device=mask.device)
    far = slots <= positions[:, None, :, None] - window
    return mask.masked_fill(far, torch.finfo(mask.dtype).min)


def ragged_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                               rows: torch.Tensor, scaling: float) -> torch.Tensor:
    """The plain computation `ragged_attention` replaces: each batch row's items (query [N, H, T, D]; T = 1 for
    a call of one item per batch row) attend to its cache row (rows: device int64 [N], into key/value
    [rows, H_kv, visible, D]) under its mask [N, 1, T, visible]; returns [N, T, H, D]."""
    gqa = query.shape[1] // key.shape[1]
    keys = key.index_select(0, rows).repeat_interleave(gqa, dim=1)
    values = value.index_select(0, rows).repeat_interleave(gqa, dim=1)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling).transpose(1, 2)


def mask_attention(decoder) -> str:
    """The attention implementation the engine's calls through `decoder` run under: the decoder's own where it
    applies an additive 4D mask as given (`MASK_ATTENTION`), else SDPA; eager for a decoder without SDPA or whose
    attention soft-caps its scores (Gemma 2), which SDPA cannot do."""
    own = decoder.config._attn_implementation
    if own in MASK_ATTENTION:
        return own
    softcaps = getattr(decoder.config, "attn_logit_softcapping", None) is not None
    return "sdpa" if getattr(decoder, "_supports_sdpa", False) and not softcaps else "eager"


@contextlib.contextmanager
def attention_implementation(config, name: str) -> Iterator[None]:
    """Within: the decoder configured by `config` attends through the attention implementation `name` (with
    `RAGGED_ATTENTION`, `ragged_attention`: SDPA attention for calls without a `ragged` argument)."""
    previous = config._attn_implementation
    if previous == name:
        yield
        return
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


AttentionInterface.register(RAGGED_ATTENTION, ragged_attention)
