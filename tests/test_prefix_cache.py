"""The training forward's weaver cache across rounds (`memgen.prefix_cache`): each stream item through the weaver
once, the same loss, logits and gradients as re-reading every prefix, and used only where that holds."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from transformers.modeling_layers import GradientCheckpointingLayer

from memgen import modeling
from memgen.modeling import _checkpointing_method
from memgen.prefix_cache import PrefixCache, enabled, rereading_prefixes
from offline import chat_tokenizer, tiny_causal_lm
from test_architectures import TINY_FIELDS, named_model
from test_modeling import make_batch, make_conversations, make_model, rel_err


# whether this transformers lets a checkpointed layer keep the cache it is passed (5.23 does; 5.4 drops it)
CHECKPOINTING_KEEPS_A_CACHE = hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")


def _step(model, input_ids, mask, labels, **kwargs):
    """Loss, logits and the weaver stage's gradients of one forward + backward."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids, mask, labels, **kwargs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.stage_parameters("weaver").items() if p.grad is not None}
    return out, grads


def _weaver_items(model, monkeypatch) -> list[int]:
    """Records the real items (stream items and queries) of each weaver call without the cache."""
    counts = []
    forward = type(model.weaver).forward

    def counting(self, inputs_embeds, attention_mask, position_ids, cache=None):
        assert cache is None
        counts.append(int(attention_mask.sum()))
        return forward(self, inputs_embeds, attention_mask, position_ids, cache)

    monkeypatch.setattr(type(model.weaver), "forward", counting)
    return counts


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_the_cache_reads_each_item_once_and_gives_the_rounds_result(arch, padding, monkeypatch):
    model = make_model(arch, k_prompt=3, k_inference=2, max_inference=4).train()
    input_ids, mask, labels = make_batch(model, [3, 0, 5, 1, 4], padding, seed=11)
    kept = []
    keep = PrefixCache.keep
    monkeypatch.setattr(PrefixCache, "keep", lambda self, call, items, ends: kept.append(int(items.sum())) or
                        keep(self, call, items, ends))
    cached, cached_grads = _step(model, input_ids, mask, labels)
    points = cached.augmentation_points
    assert (points != 0).sum(1).tolist() == [4, 1, 5, 2, 5]
    # every stream item before a row's last weave, once: its tokens there and its earlier weaves' latents
    stream_index = mask.long().cumsum(1) - 1 + torch.where(points == 1, 3, torch.where(points == 2, 2, 0)).cumsum(1)
    last = torch.where(points != 0, stream_index - torch.where(points == 1, 3, 2), 0).amax(1)
    assert sum(kept) == int(last.sum())

    items = _weaver_items(model, monkeypatch)
    with rereading_prefixes():
        rounds, rounds_grads = _step(model, input_ids, mask, labels)
    assert sum(items) > 2 * sum(kept), "re-reading the prefixes reads many more items"
    assert rel_err(cached.loss, rounds.loss) < 1e-6
    assert rel_err(cached.logits, rounds.logits) < 1e-5
    assert cached_grads.keys() == rounds_grads.keys() and len(cached_grads) >= 6
    for name, grad in rounds_grads.items():
        assert rel_err(cached_grads[name], grad) < 1e-4, name


def test_conversations_and_a_weaver_on_a_base_of_its_own(monkeypatch):
    """Several prompt points per row (one per turn), and a weaver base with another hidden size."""
    weaver_base = tiny_causal_lm("llama", len(chat_tokenizer()), hidden_size=32, seed=9)
    model = make_model("qwen2", max_prompt=3, max_inference=2, weaver_base=weaver_base).train()
    input_ids, mask, labels = make_conversations(model, [3, 1, 2, 4], "right", seed=4)
    made = []
    prefix_cache = modeling.MemGenModel._prefix_cache
    monkeypatch.setattr(modeling.MemGenModel, "_prefix_cache",
                        lambda self, stream: made.append(prefix_cache(self, stream)) or made[-1])
    cached, cached_grads = _step(model, input_ids, mask, labels, generator=torch.Generator().manual_seed(7))
    assert isinstance(made[0], PrefixCache)
    with rereading_prefixes():
        rounds, rounds_grads = _step(model, input_ids, mask, labels, generator=torch.Generator().manual_seed(7))
    assert rel_err(cached.loss, rounds.loss) < 1e-6 and rel_err(cached.logits, rounds.logits) < 1e-5
    for name, grad in rounds_grads.items():
        assert rel_err(cached_grads[name], grad) < 1e-4, name


def _gate(model, length=40):
    return model._prefix_cache(torch.zeros(2, length, model.reasoner.config.hidden_size))


def test_the_cache_is_used_only_where_it_gives_the_rounds_result():
    # LoRA dropout: re-reading draws new masks for a prefix at every weave, the cache would reuse one draw
    dropping = make_model("qwen2")
    for layer in modeling.tuner_layers(dropping.weaver.model):
        layer.lora_dropout["weaver"] = torch.nn.Dropout(0.1)
    assert _gate(dropping.train()) is None
    assert isinstance(_gate(dropping.eval()), PrefixCache)
    # activation checkpointing: kept where transformers' checkpointed layers can keep a cache and recompute without
    # reentrancy (memgen's `activation_checkpointing_enable`), not under reentrant recomputation (its first forward
    # runs without autograd) nor under torch's checkpoint wrapper
    checkpointed = make_model("qwen2")
    checkpointed.activation_checkpointing_enable()
    assert (_gate(checkpointed.train()) is not None) == CHECKPOINTING_KEEPS_A_CACHE
    reentrant = make_model("qwen2")
    _checkpointing_method(reentrant.weaver.model, "enable")({"use_reentrant": True})
    assert _gate(reentrant.train()) is None and isinstance(_gate(reentrant.eval()), PrefixCache)
    wrapped = make_model("qwen2").train()
    layers = wrapped.weaver.model.get_decoder().layers
    layers[0] = checkpoint_wrapper(layers[0])
    assert _gate(wrapped) is None
    # a sliding window that may bind (the 4D mask would not apply it)
    windowed = named_model("MistralConfig", "MistralForCausalLM", ["q_proj", "v_proj"], sliding_window=16,
                           **TINY_FIELDS)
    assert _gate(windowed, length=8) is not None and _gate(windowed, length=40) is None
    # a decoder class the tests do not cover
    persimmon = named_model("PersimmonConfig", "PersimmonForCausalLM", ["query_key_value"], **TINY_FIELDS)
    assert _gate(persimmon) is None
    # asked not to
    plain = make_model("qwen2").train()
    assert isinstance(_gate(plain), PrefixCache)
    with pytest.raises(RuntimeError), rereading_prefixes():
        assert _gate(plain) is None and not enabled()
        raise RuntimeError("a failing step")
    assert enabled() and isinstance(_gate(plain), PrefixCache)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_under_activation_checkpointing_the_same_gradients(arch, monkeypatch):
    """With the layers recomputed in backward: the same loss and gradients, and the cache kept where transformers
    lets a checkpointed layer keep one (the recomputation reads the kept tensors as its call first saw them)."""
    model = make_model(arch).train()
    input_ids, mask, labels = make_batch(model, [2, 4, 1, 3], "left", seed=5)
    want, want_grads = _step(model, input_ids, mask, labels)
    model.activation_checkpointing_enable()
    kept = []
    keep = PrefixCache.keep
    monkeypatch.setattr(PrefixCache, "keep", lambda self, *args: kept.append(1) or keep(self, *args))
    got, got_grads = _step(model, input_ids, mask, labels)
    assert bool(kept) == CHECKPOINTING_KEEPS_A_CACHE
    assert all("_can_checkpoint_with_cache" not in layer.__dict__ for layer in model.weaver.model.get_decoder().layers)
    assert rel_err(got.loss, want.loss) < 1e-6
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert rel_err(got_grads[name], grad) < 1e-4, name


def test_a_weaver_base_loaded_with_flash_attention_reads_through_sdpa(monkeypatch):
    """The cache's calls pass a 4D mask, which flash attention would misread: they run under SDPA."""
    weaver_base = tiny_causal_lm("qwen3", len(chat_tokenizer()), seed=3)
    model = make_model("qwen2", weaver_base=weaver_base).train()
    input_ids, mask, labels = make_batch(model, [2, 3, 0], "right", seed=6)
    want, want_grads = _step(model, input_ids, mask, labels)

    def misreads_the_mask(*args, **kwargs):
        raise AssertionError("flash attention was called")

    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", misreads_the_mask)
    monkeypatch.setattr(weaver_base.get_decoder().config, "_attn_implementation", "flash_attention_2")
    got, got_grads = _step(model, input_ids, mask, labels)
    assert weaver_base.get_decoder().config._attn_implementation == "flash_attention_2"
    assert rel_err(got.loss, want.loss) < 1e-6
    for name, grad in want_grads.items():
        assert rel_err(got_grads[name], grad) < 1e-5, name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfloat16_the_cache_errs_no_more_than_re_reading_does(seed):
    """A bfloat16 base: the cache and re-reading, each against the same model in float32. Low precision moves both
    far from float32 (a latent scale's gradient sums many cancelling terms), so the cache's error is bounded by
    re-reading's own."""
    model = make_model("qwen2", dtype=torch.bfloat16, seed=seed).train()
    exact = copy.deepcopy(model)
    exact.reasoner.to(torch.float32)
    input_ids, mask, labels = make_batch(model, [3, 0, 5, 1, 4], "left", seed=seed)
    cached, cached_grads = _step(model, input_ids, mask, labels)
    with rereading_prefixes():
        rounds, rounds_grads = _step(model, input_ids, mask, labels)
    want, want_grads = _step(exact, input_ids, mask, labels)

    def worst(grads):
        return max(rel_err(grads[name].float(), grad) for name, grad in want_grads.items())

    assert rel_err(cached.logits.float(), want.logits) <= 1.5 * rel_err(rounds.logits.float(), want.logits) + 1e-3
    assert rel_err(cached.loss, want.loss) <= 1e-4
    assert worst(cached_grads) <= 2.5 * worst(rounds_grads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_the_cache_gives_the_rounds_result(dtype):
    model = make_model("qwen2", dtype=dtype).to("cuda").train()
    input_ids, mask, labels = (t.cuda() for t in make_batch(model, [3, 0, 5, 1, 4], "right", seed=2))
    cached, cached_grads = _step(model, input_ids, mask, labels)
    with rereading_prefixes():
        rounds, rounds_grads = _step(model, input_ids, mask, labels)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(cached.loss, rounds.loss) < tolerance
    assert rel_err(cached.logits.float(), rounds.logits.float()) < tolerance
    if dtype == torch.float32:
        for name, grad in rounds_grads.items():
            assert rel_err(cached_grads[name], grad) < 1e-4, name
