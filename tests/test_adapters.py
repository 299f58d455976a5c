"""SplitBatch: one call over a shared base, the bare base on the leading rows and adapters on ranges of the rest."""

from __future__ import annotations

import pytest
import torch

from memgen.adapters import BareBase, SplitBatch, active_adapter, tuner_layers
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
