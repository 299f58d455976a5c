"""Ragged attention (items grouped by cache row) equals each item attending to a copy of its row's cache."""

from __future__ import annotations

import pytest
import torch

from memgen.attention import (RAGGED_ATTENTION, PaddedRows, RaggedGroups, attention_implementation, mask_attention,
                              ragged_attention, ragged_attention_reference, windowed)
from test_modeling import make_model


def _call(seed: int, counts: list[int], rows: list[int], n_cache_rows: int, heads: int, kv_heads: int,
          dtype: torch.dtype):
    """A call of one item per batch row: cache rows `rows` read counts[i] items each, after a random number of
    earlier items; (query, key, value, additive mask [N, 1, 1, visible], the item's cache row [N], groups, the
    item's position [N])."""
    g = torch.Generator().manual_seed(seed)
    counts_t, rows_t = torch.tensor(counts, dtype=torch.int32), torch.tensor(rows)
    lengths = torch.randint(0, 9, (len(rows),), generator=g)
    visible = int((lengths + counts_t).max())
    dim = 8
    query = torch.randn(int(counts_t.sum()), heads, 1, dim, generator=g).to(dtype)
    key = torch.randn(n_cache_rows, kv_heads, visible, dim, generator=g).to(dtype)
    value = torch.randn(n_cache_rows, kv_heads, visible, dim, generator=g).to(dtype)
    item_rows = rows_t.repeat_interleave(counts_t.long())
    item = torch.cat([torch.arange(c) for c in counts])
    sees = lengths.repeat_interleave(counts_t.long()) + item + 1  # item j of a row sees its earlier slots and its own
    mask = torch.zeros(query.shape[0], 1, 1, visible, dtype=dtype)
    mask.masked_fill_(torch.arange(visible) >= sees[:, None, None, None], torch.finfo(dtype).min)
    groups = RaggedGroups(rows_t, counts_t, mask, heads // kv_heads, lambda *t: list(t))
    return query, key, value, mask, item_rows, groups, sees - 1


def test_windowed_hides_the_slots_a_window_before_each_item():
    dtype = torch.float32
    positions = torch.tensor([[0, 3, 4], [6, 7, 7]])  # (the last, a padding item, repeats its row's last position)
    sees = torch.tensor([[1, 4, 5], [7, 8, 8]])
    mask = torch.zeros(2, 1, 3, 9, dtype=dtype).masked_fill(torch.arange(9) >= sees[:, None, :, None],
                                                            torch.finfo(dtype).min)
    got = windowed(mask, positions, 3)
    seen = got[:, 0] == 0
    for g in range(2):
        for t in range(3):
            p = int(positions[g, t])
            assert seen[g, t].nonzero().flatten().tolist() == list(range(max(0, p - 2), p + 1))
    assert torch.equal(windowed(mask, positions, 9), mask)  # a window past every slot changes nothing


LAYOUTS = {
    "singles in a range": ([1, 1, 1, 1, 1], [0, 1, 2, 4, 5], 7),
    "singles spread": ([1, 1], [0, 13], 16),
    "several": ([3, 5, 2], [2, 9, 4], 12),
    "mixed": ([1, 4, 1, 1, 9, 1], [0, 7, 1, 3, 11, 2], 14),
    "one row": ([6], [3], 5),
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ragged_attention_equals_reference(layout, heads, kv_heads, dtype):
    counts, rows, n_cache_rows = LAYOUTS[layout]
    for seed in range(3):
        query, key, value, mask, item_rows, groups, positions = _call(seed, counts, rows, n_cache_rows, heads,
                                                                      kv_heads, dtype)
        # and under a sliding window's mask (the same groups, masked again)
        window_mask = windowed(mask, positions[:, None], 3)
        # each layer of a call attends through the same groups (and their sliding twins): a layer's own queries
        for layer_query in (query, query.flip(0)):
            for call_mask, call_groups in ((mask, groups), (window_mask, groups.masked(window_mask))):
                module = torch.nn.Module()
                got, _ = ragged_attention(module, layer_query, key, value, None, scaling=0.3, ragged=call_groups)
                want = ragged_attention_reference(layer_query, key, value, call_mask, item_rows, 0.3)
                assert got.shape == want.shape == (query.shape[0], 1, heads, query.shape[-1])
                tolerance = 1e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


def test_ragged_attention_uses_views_for_nearby_single_rows_and_gathers_the_rest():
    *_, near, _ = _call(0, [1, 1, 1], [0, 1, 3], 4, 2, 2, torch.float32)
    *_, spread, _ = _call(0, [1, 1, 4], [0, 9, 5], 10, 2, 2, torch.float32)
    assert [g.rows for g in near.groups] == [(0, 4)]
    assert isinstance(spread.groups[0].rows, torch.Tensor) and spread.groups[0].rows.tolist() == [0, 9]
    assert spread.groups[1].rows.tolist() == [5] and spread.groups[1].width == 4


PADDED = {  # cache rows of a call laid out one batch row per row, the cache's rows
    "leading, in order": ([0, 1, 2, 3], 6),
    "a range, in order": ([2, 3, 4], 8),
    "a range, out of order": ([5, 2, 3, 0], 7),
    "with gaps": ([1, 4, 2, 7], 9),  # a span of 7 for 4 rows: viewed, with dummy queries
    "spread": ([0, 11], 14),  # a span of 12 for 2 rows: gathered
}


@pytest.mark.parametrize("layout", PADDED, ids=list(PADDED))
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_rows_attention_equals_reference(layout, heads, kv_heads, dtype):
    """A call of one batch row per cache row, T items each (ragged counts, padded; rows in any order): attending
    through `PaddedRows` equals each row attending to a copy of its cache row with its key heads repeated."""
    rows, n_cache_rows = PADDED[layout]
    rows_t = torch.tensor(rows)
    for seed, width in enumerate((1, 3, 5)):
        g = torch.Generator().manual_seed(seed)
        counts = torch.randint(1, width + 1, (len(rows),), generator=g)
        lengths = torch.randint(0, 9, (len(rows),), generator=g)
        visible = int((lengths + width).max())
        query = torch.randn(len(rows), heads, width, 8, generator=g).to(dtype).transpose(1, 2).contiguous()
        query = query.transpose(1, 2)  # [G, H, T, D] laid out [G, T, H, D], as the layers hand it over
        key = torch.randn(n_cache_rows, kv_heads, visible, 8, generator=g).to(dtype)
        value = torch.randn(n_cache_rows, kv_heads, visible, 8, generator=g).to(dtype)
        item = torch.arange(width)
        sees = lengths[:, None] + torch.minimum(item, counts[:, None] - 1) + 1  # padding repeats the last item
        mask = torch.zeros(len(rows), 1, width, visible, dtype=dtype)
        mask.masked_fill_(torch.arange(visible) >= sees[:, None, :, None], torch.finfo(dtype).min)
        padded = PaddedRows(rows_t, rows_t, mask, heads // kv_heads)
        window_mask = windowed(mask, sees - 1, 3)
        # each layer of a call attends through the same PaddedRows (and its sliding twin): a layer's own queries
        for layer_query in (query, query.flip(0)):
            for call_mask, call_rows in ((mask, padded), (window_mask, padded.masked(window_mask))):
                got, _ = ragged_attention(torch.nn.Module(), layer_query, key, value, None, scaling=0.3,
                                          ragged=call_rows)
                want = ragged_attention_reference(layer_query, key, value, call_mask, rows_t, 0.3)
                assert got.shape == want.shape == (len(rows), width, heads, 8)
                tolerance = 1e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


def test_padded_rows_view_their_span_unless_it_is_more_than_twice_the_rows():
    mask = torch.zeros(4, 1, 2, 5)
    leading, out_of_order = PaddedRows(torch.arange(4), None, mask, 2), PaddedRows(torch.tensor([4, 2, 3, 1]),
                                                                                     torch.tensor([4, 2, 3, 1]), mask, 2)
    assert (leading.span, leading.places, leading.gathered) == ((0, 4), None, None)
    assert out_of_order.span == (1, 5) and out_of_order.places.tolist() == [3, 1, 2, 0]
    assert out_of_order.mask.shape == (4, 1, 4, 5)  # T * gqa query rows
    spread = PaddedRows(torch.tensor([0, 11]), torch.tensor([0, 11]), mask[:2], 2)
    assert spread.span is None and spread.gathered.tolist() == [0, 11] and spread.places is None
    # worth it while the mask per query head stays under the repeated keys and values: weaves, not long prompts
    assert PaddedRows.pays(64, 7, 14, 64) and not PaddedRows.pays(300, 7, 14, 64)


def test_attention_implementation_switches_only_within_and_ragged_attention_is_sdpa_without_groups():
    model = make_model("qwen2")
    base = model.reasoner
    config = base.get_decoder().config
    ids = torch.randint(0, base.config.vocab_size, (2, 7))
    want = base(input_ids=ids).logits
    with attention_implementation(config, RAGGED_ATTENTION):
        assert config._attn_implementation == RAGGED_ATTENTION
        got = base(input_ids=ids).logits  # no `ragged` argument: SDPA attention
    assert config._attn_implementation == "sdpa"
    torch.testing.assert_close(got, want)
    with pytest.raises(RuntimeError), attention_implementation(config, "eager"):
        raise RuntimeError("a failing call")
    assert config._attn_implementation == "sdpa"


@pytest.mark.parametrize("own,supports_sdpa,softcap,want", [
    ("sdpa", True, None, "sdpa"), ("eager", True, None, "eager"), ("flash_attention_2", True, None, "sdpa"),
    ("flex_attention", True, None, "sdpa"), ("paged|sdpa", True, None, "sdpa"),
    ("flash_attention_2", False, None, "eager"), ("flash_attention_2", True, 50.0, "eager"),
    ("eager", True, 50.0, "eager")])
def test_the_engine_attends_through_an_implementation_that_applies_its_masks(own, supports_sdpa, softcap, want,
                                                                             monkeypatch):
    """SDPA where the model's own attention would misread the engine's masks; eager where SDPA cannot do what the
    model's attention does (soft-capped scores, as Gemma 2's)."""
    decoder = make_model("qwen2").reasoner.get_decoder()
    monkeypatch.setattr(decoder.config, "_attn_implementation", own)
    monkeypatch.setattr(type(decoder), "_supports_sdpa", supports_sdpa)
    monkeypatch.setattr(decoder.config, "attn_logit_softcapping", softcap, raising=False)
    assert mask_attention(decoder) == want
