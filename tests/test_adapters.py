"""SplitBatch: one call over a shared base, the bare base on the leading rows and adapters on ranges of the rest."""

from __future__ import annotations

import pytest
import torch

from memgen.adapters import BareBase, SplitBatch, active_adapter, add_lora_adapter, tuner_layers
from memgen.config import DEFAULT_LORA
from offline import tiny_causal_lm
from test_reference_generation import chatty_model


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start", [0, 2, 5])
def test_each_row_gets_what_its_own_call_gives(arch, dtype, start):
    model = chatty_model(arch, "lora", dtype=dtype)
    base = model.reasoner
    decoder = base.get_decoder()
    g = torch.Generator().manual_seed(start)
    items = torch.randn(5, 7, base.config.hidden_size, generator=g).to(dtype)
    positions = torch.arange(7).expand(5, -1)
    with torch.no_grad():
        with SplitBatch(base, "trigger")(start):
            joint = decoder(inputs_embeds=items, position_ids=positions).last_hidden_state
        if start > 0:
            with BareBase(base)():
                bare = decoder(inputs_embeds=items[:start], position_ids=positions[:start]).last_hidden_state
            assert torch.allclose(joint[:start], bare, rtol=1e-5, atol=1e-6)
        if start < 5:
            with active_adapter(base, "trigger"):
                adapted = decoder(inputs_embeds=items[start:], position_ids=positions[start:]).last_hidden_state
            assert torch.allclose(joint[start:], adapted, rtol=1e-5, atol=1e-6)
            with BareBase(base)():  # and the adapter does change the rows it runs on
                plain = decoder(inputs_embeds=items[start:], position_ids=positions[start:]).last_hidden_state
            assert not torch.allclose(adapted, plain, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("starts", [(1, 3), (0, 6), (2, 2), (6, 6)])
def test_two_adapters_each_on_their_own_rows(starts):
    """The weaver's and the trigger's adapters in one call (they sit on the same layers): each row gets what
    the call through its own adapter gives, the leading rows the bare base's."""
    model = chatty_model("qwen2", "lora")
    base = model.reasoner
    decoder = base.get_decoder()
    items = torch.randn(6, 5, base.config.hidden_size, generator=torch.Generator().manual_seed(sum(starts)))
    positions = torch.arange(5).expand(6, -1)
    bounds = [0, *starts, 6]
    with torch.no_grad():
        with SplitBatch(base, "trigger", "weaver")(*starts):
            joint = decoder(inputs_embeds=items, position_ids=positions).last_hidden_state
        for (start, end), context in zip(zip(bounds, bounds[1:]), [BareBase(base)(), active_adapter(base, "trigger"),
                                                                   active_adapter(base, "weaver")]):
            if end > start:
                with context:
                    alone = decoder(inputs_embeds=items[start:end], position_ids=positions[start:end]).last_hidden_state
                assert torch.allclose(joint[start:end], alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one non-decreasing start per adapter"):
        SplitBatch(base, "trigger", "weaver")(3, 1)


def test_the_model_is_back_as_it_was_after_the_call_and_after_an_error():
    model = chatty_model("qwen2", "lora")
    before = [(name, type(m)) for name, m in model.reasoner.named_modules()]
    split = SplitBatch(model.reasoner, "trigger")
    with pytest.raises(RuntimeError, match="boom"):
        with split(1):
            raise RuntimeError("boom")
    assert [(name, type(m)) for name, m in model.reasoner.named_modules()] == before


def test_supported_only_for_plain_unmerged_lora():
    model = chatty_model("qwen2", "lora")
    assert SplitBatch.supported(model.reasoner, "trigger") and SplitBatch.supported(model.reasoner, "weaver")
    assert not SplitBatch.supported(model.reasoner, "no such adapter")
    tuner_layers(model.reasoner)[0].merged_adapters.append("trigger")  # a merged adapter's update is in the base
    assert not SplitBatch.supported(model.reasoner, "trigger")


def _adapted(arch: str, seed: int, dtype: torch.dtype = torch.float32, **weaver_settings):
    """A tiny base in `dtype` with adapters `trigger` (the defaults: q and v) and `weaver` (weaver_settings),
    float32 unless the base is float64, their weights random so that both change what the layers compute."""
    base = tiny_causal_lm(arch, 50, hidden_size=32, seed=seed).to(dtype)
    add_lora_adapter(base, "trigger", {**DEFAULT_LORA, "lora_dropout": 0.0})
    add_lora_adapter(base, "weaver", {**DEFAULT_LORA, "lora_dropout": 0.0, **weaver_settings})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_" in name:
                p.data = (torch.randn(p.shape, generator=g) * 0.2).to(torch.float64 if dtype == torch.float64
                                                                      else torch.float32)
    return base.eval()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("weaver_settings", [
    {},  # q and v, scaling 2: folded into the B blocks
    {"target_modules": "all-linear", "lora_alpha": 24},  # q, k, v and gate, up share inputs; scaling 1.5
    {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "r": 4, "use_rslora": True},  # o reads alone
])
def test_siblings_reading_one_input_share_their_products(arch, dtype, weaver_settings):
    """From SplitBatch's second call, the LoRA layers of one parent that read the same input (found in the first
    call) compute their updates together: the rows still get what each adapter's own call gives, and the groups
    are exactly the layers that share an input. (float64: the arithmetic, to rounding; float32 differs from the
    separate products by rounding that this model's large random updates amplify; bfloat16: a bfloat16 base's
    input cast once for the float32 updates.)"""
    base = _adapted(arch, len(str(weaver_settings)), dtype, **weaver_settings)
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    decoder = base.get_decoder()
    split = SplitBatch(base, "trigger", "weaver")
    g = torch.Generator().manual_seed(3)
    for call in range(3):
        items = torch.randn(7, 3 + call, base.config.hidden_size, generator=g).to(dtype)
        positions = torch.arange(3 + call).expand(7, -1)
        with torch.no_grad():
            with split(2, 4):
                joint = decoder(inputs_embeds=items, position_ids=positions).last_hidden_state
            for (start, end), name in (((2, 4), "trigger"), ((4, 7), "weaver")):
                with active_adapter(base, name):
                    alone = decoder(inputs_embeds=items[start:end], position_ids=positions[start:end])
                torch.testing.assert_close(joint[start:end], alone.last_hidden_state, **tolerance)
    names = {}
    for swap in split.split:
        for (group, place), index in zip(filter(None, swap.siblings), swap.indices):
            names.setdefault((id(group), index), []).append(swap.base)
    path = {id(m): n.split(".")[-2] for n, m in base.named_modules() if n.endswith(".base_layer")}
    groups = sorted({(index, tuple(sorted(path[id(m)] for m in members))) for (_, index), members in names.items()})
    targets = weaver_settings.get("target_modules", ["q_proj", "v_proj"])
    expected = {(0, ("q_proj", "v_proj"))}
    if targets == "all-linear":
        expected |= {(1, ("k_proj", "q_proj", "v_proj")), (1, ("gate_proj", "up_proj"))}
    else:
        expected.add((1, tuple(sorted(set(targets) - {"o_proj"}))))
    assert set(groups) == expected
    assert len(names) == len(expected) * base.config.num_hidden_layers  # one group per layer
    assert all(group.x is None for group in split.groups)  # nothing held between calls


def test_siblings_are_not_used_where_gradients_or_dropout_are():
    """A call that records gradients, or runs dropout, takes each layer's own update: the shared products are
    copies of the weights made without gradients, and dropout draws a mask per layer."""
    base = _adapted("qwen2", seed=1)
    decoder = base.get_decoder()
    split = SplitBatch(base, "trigger", "weaver")
    items = torch.randn(3, 4, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), split(1, 2):
        decoder(inputs_embeds=items)
    assert split.groups
    weaver_B = next(p for n, p in base.named_parameters() if "lora_B.weaver" in n)
    with split(1, 2):
        decoder(inputs_embeds=items).last_hidden_state[2:].sum().backward()
    assert weaver_B.grad is not None and weaver_B.grad.abs().sum() > 0
