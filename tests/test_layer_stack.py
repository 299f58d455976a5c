"""Driving a decoder's layers directly gives the same tensors as its forward, and is declined where it would not."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from memgen.adapters import active_adapter
from memgen.cache import RaggedCache
from memgen.layer_stack import cache_keyword, direct_call, forward_call
from memgen.ops import pack_ragged
from test_architectures import ARCHITECTURES, THROUGH_FORWARD, other_model
from test_modeling import make_model


def _ragged_calls(decoder, call, stream, seed):
    """A ragged prefill, then a step where rows read different numbers of items; both calls' hidden states."""
    batch, length, _ = stream.shape
    cache = RaggedCache(decoder.config.num_hidden_layers, batch, length + 4, stream.device)
    rows = torch.arange(batch)
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(1, length // 2, (batch,), generator=g, dtype=torch.int32)
    second = torch.randint(1, length // 2, (batch,), generator=g, dtype=torch.int32)
    outputs = []
    for seen, pending, cache_rows in ((torch.zeros_like(first), first, batch), (first, second, rows)):
        items, positions, slots, mask = pack_ragged(stream, rows, seen, pending, int(pending.max()), None,
                                                    length + 4, int((seen + pending).max()))
        cache.prepare(cache_rows, slots, mask.shape[-1])  # the leading rows (views), then rows by index (copies)
        outputs.append(call(items, mask, positions, cache))
    return outputs


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama", *(a for a in ARCHITECTURES if a not in THROUGH_FORWARD)])
@pytest.mark.parametrize("adapter", [None, "weaver"])
def test_direct_call_equals_forward(arch, adapter):
    model = make_model(arch) if arch in ("qwen2", "qwen3", "llama") else other_model(arch)
    base = model.weaver.model
    decoder = base.get_decoder()
    direct = direct_call(decoder)
    assert direct is not None, f"{type(decoder).__name__} should be driven directly"
    stream = torch.randn(5, 13, decoder.config.hidden_size, generator=torch.Generator().manual_seed(7))
    name = model.weaver.adapter_name if adapter else None
    with torch.no_grad(), active_adapter(base, name):
        want = _ragged_calls(decoder, forward_call(decoder), stream, seed=11)
        got = _ragged_calls(decoder, direct, stream, seed=11)
    for w, o in zip(want, got):
        assert torch.equal(w, o)


def test_direct_call_is_declined_where_the_forward_does_more():
    other = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4))
    assert direct_call(other.get_decoder()) is None, "a class not known to be a plain layer stack"
    hooked = make_model("qwen2").reasoner.get_decoder()
    hooked.register_forward_pre_hook(lambda module, args: None)
    assert direct_call(hooked) is None, "a hook on the decoder must still run"


def test_the_cache_goes_under_the_keyword_the_installed_transformers_takes():
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name warns until 5.40): the engine passes
    the cache under whichever name the layer and decoder forwards declare."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2Model

    class New(nn.Module):
        def forward(self, hidden_states, cache=None, **kwargs):
            pass

    class Old(nn.Module):
        def forward(self, hidden_states, past_key_values=None, **kwargs):
            pass

    class Wrapping(New):  # a user's subclass that hands its keyword arguments on to the parent's forward
        def forward(self, hidden_states, **kwargs):
            return super().forward(hidden_states, **kwargs)

    assert [cache_keyword(cls) for cls in (New, Old, Wrapping)] == ["cache", "past_key_values", "cache"]
    for cls in (Qwen2DecoderLayer, Qwen2Model):
        assert cache_keyword(cls) in inspect.signature(cls.forward).parameters
