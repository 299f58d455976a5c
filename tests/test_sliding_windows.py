"""Sliding attention windows shorter than the sequences: generation applies them as the models' own forwards do
(a mask per layer kind), and the training forward keeps them; decoders that cannot take such masks are refused."""

from __future__ import annotations

import pytest
import torch
import transformers

from memgen import MemGenConfig, MemGenModel
from memgen.layer_stack import FULL, SLIDING, applies_windows, direct_call, layer_kinds
from memgen.reference import reference_generate
from offline import chat_tokenizer
from test_architectures import TINY_FIELDS, named_model
from test_generation import Streamed, assert_same_as_reference, packing  # noqa: F401 (a fixture)
from test_modeling import assert_matches_reference, make_batch

WINDOW = 8
MIXED = {"layer_types": [SLIDING, FULL]}

# config class, model class, config fields, LoRA targets, driven directly
WINDOWED = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, max_window_layers=1),
              ["q_proj", "v_proj"], True),  # full, then sliding
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, ["q_proj", "v_proj"], True),  # every layer slides
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, ["qkv_proj"], True),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", dict(sliding_window_pattern=2), ["q_proj", "v_proj"], True),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(use_sliding_window=True, head_dim=16, moe_intermediate_size=32, num_experts=4,
                       num_experts_per_tok=2), ["q_proj", "v_proj"], True),  # every layer slides (no `layer_types`)
    # through their forward: a dict of masks, or (every layer sliding) one mask
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, final_logit_softcapping=2.0),
               ["q_proj", "v_proj"], False),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, **MIXED), ["q_proj", "v_proj"], False),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                                          **MIXED), ["q_proj", "v_proj"], False),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(logit_scale=1.0, tie_word_embeddings=False, **MIXED),
                ["q_proj", "v_proj"], False),
    "ministral": ("MinistralConfig", "MinistralForCausalLM", dict(head_dim=16, **MIXED), ["q_proj", "v_proj"], False),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2),
                ["q_proj", "v_proj"], False),
}


def windowed_model(arch: str, trigger_mode: str = "always", window: int = WINDOW) -> MemGenModel:
    config_name, model_name, extra, targets, _ = WINDOWED[arch]
    return named_model(config_name, model_name, targets, trigger_mode, **TINY_FIELDS, sliding_window=window, **extra)


@pytest.mark.parametrize("arch", WINDOWED)
def test_layer_kinds_and_paths(arch):
    model = windowed_model(arch)
    decoder = model.reasoner.get_decoder()
    kinds = layer_kinds(decoder.config)
    assert SLIDING in kinds and set(kinds) <= {FULL, SLIDING}
    assert applies_windows(decoder)
    assert (direct_call(decoder) is not None) == WINDOWED[arch][4]


@pytest.mark.parametrize("arch", WINDOWED)
@pytest.mark.parametrize("trigger_mode", ["always", "lora", "head"])
def test_generation_applies_the_window(arch, trigger_mode):
    model = windowed_model(arch, trigger_mode)
    input_ids, mask, _ = make_batch(model, [0] * 3, "left", seed=4)
    assert int(mask.sum(1).min()) + 24 > 2 * WINDOW  # every row spans two windows and more
    out = assert_same_as_reference(model, input_ids, mask, max_new_tokens=24)
    assert (out.augmentation_mask[:, 1:] == 1).any(), "some row should weave after its prompt"
    # the window binds here: the reference without it chooses other tokens
    unbound = windowed_model(arch, trigger_mode, window=512)
    unbound.load_state_dict(model.state_dict())
    with torch.no_grad():
        free, _ = reference_generate(unbound, input_ids, mask, max_new_tokens=24)
    assert not torch.equal(free, out.sequences)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma2"])
@pytest.mark.parametrize("trigger_mode", ["always", "lora"])
def test_one_row(arch, trigger_mode):
    """At batch 1 a plain step's full-attention layers attend without a mask (it would hide nothing); the sliding
    layers keep theirs."""
    model = windowed_model(arch, trigger_mode)
    input_ids, mask, _ = make_batch(model, [0], "left", seed=2)
    out = assert_same_as_reference(model, input_ids, mask, max_new_tokens=40)
    assert (out.augmentation_mask[:, 1:] == 1).any()


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
@pytest.mark.parametrize("trigger_mode", ["always", "lora"])
@pytest.mark.parametrize("in_step", [False, True], ids=["run ahead", "in step"])
def test_rows_of_a_batch_keep_their_own_windows(arch, trigger_mode, in_step, packing):
    """Rows of different lengths, weaving at different steps, under each layout and schedule of the engine's calls
    (`packing`; a streamer keeps the rows in step): each row equals the reference run alone."""
    model = windowed_model(arch, trigger_mode)
    input_ids, mask, _ = make_batch(model, [0] * 5, "right", seed=9)
    want_sequences, want_mask = reference_generate(model, input_ids, mask, max_new_tokens=40)
    out = model.generate(input_ids, mask, max_new_tokens=40, return_dict_in_generate=True,
                         streamer=Streamed() if in_step else None)
    assert torch.equal(out.sequences, want_sequences)
    assert torch.equal(out.augmentation_mask, want_mask)


@pytest.mark.parametrize("arch", ["qwen2", "exaone4"])
def test_a_hooked_direct_decoder_gets_the_dict_through_its_forward(arch):
    """A hook on the decoder sends its calls through its forward, which takes the masks as a dict."""
    model = windowed_model(arch, "always")
    decoder = model.reasoner.get_decoder()
    decoder.register_forward_pre_hook(lambda module, args: None)
    assert direct_call(decoder) is None and applies_windows(decoder)
    input_ids, mask, _ = make_batch(model, [0] * 3, "left", seed=4)
    assert_same_as_reference(model, input_ids, mask, max_new_tokens=24)


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "mixtral"])
def test_training_forward_keeps_the_window(arch):
    model = windowed_model(arch)
    input_ids, mask, labels = make_batch(model, [3, 0, 5], "right", seed=5)
    assert int(mask.sum(1).max()) > 2 * WINDOW
    assert_matches_reference(model, input_ids, mask, labels)


def test_a_decoder_that_cannot_take_window_masks_is_refused_past_its_window():
    tok = chat_tokenizer()
    config = transformers.GPTNeoXConfig(**TINY_FIELDS, vocab_size=len(tok))
    config.sliding_window, config.layer_types = 32, [FULL, SLIDING]  # as a mixed model's config would say
    model = MemGenModel.from_reasoner(transformers.GPTNeoXForCausalLM(config).eval(), tok,
                                      MemGenConfig(prompt_latents_len=2, inference_latents_len=2,
                                                   weaver_lora={"target_modules": ["query_key_value"]})).eval()
    assert not applies_windows(model.reasoner.get_decoder())
    input_ids, mask, _ = make_batch(model, [0, 0], "left", seed=1)
    room = 32 - int(mask.sum(1).max()) - 2 - 2 * model.config.max_inference_aug_num
    with pytest.raises(ValueError, match="the reasoner's sliding attention window of 32 .* cannot apply to GPTNeoX"):
        model.generate(input_ids, mask, max_new_tokens=room + 1)
    model.generate(input_ids, mask, max_new_tokens=room)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
@pytest.mark.parametrize("trigger_mode", ["always", "lora", "head"])
def test_cuda_engine_applies_the_window(arch, trigger_mode):
    """On a GPU: padded layouts, the weaver in the reasoner's calls in every mode."""
    model = windowed_model(arch, trigger_mode).to("cuda")
    input_ids, mask, _ = make_batch(model, [0] * 5, "left", seed=4)
    assert_same_as_reference(model, input_ids.cuda(), mask.cuda(), max_new_tokens=24)
