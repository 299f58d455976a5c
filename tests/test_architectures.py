"""Decoders other than Qwen2, Qwen3 and Llama: generation and the training forward equal the reference for those the
engine drives directly (`memgen.layer_stack.DIRECT_DECODERS`) and for those it runs through their own forward."""

from __future__ import annotations

import pytest
import torch
import transformers

from memgen import MemGenConfig, MemGenModel
from memgen.layer_stack import direct_call
from memgen.logits import logits_function
from memgen.reference import reference_generate
from offline import chat_tokenizer
from test_generation import assert_same_as_reference, loaded_with_attention
from test_modeling import assert_matches_reference, make_batch

# class name prefix, extra config fields, the LoRA targets (attention projections under the model's own names)
ARCHITECTURES = {
    "mistral": ("Mistral", {"sliding_window": None}, ["q_proj", "v_proj"]),  # (Mistral's default window is 4096)
    "phi3": ("Phi3", {}, ["qkv_proj"]),  # fused projections
    "olmo2": ("Olmo2", {}, ["q_proj", "v_proj"]),  # norms after attention and MLP
    "qwen2_moe": ("Qwen2Moe", {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "num_experts": 4,
                               "num_experts_per_tok": 2}, ["q_proj", "v_proj"]),
    "qwen3_moe": ("Qwen3Moe", {"head_dim": 16, "moe_intermediate_size": 32, "num_experts": 4,
                               "num_experts_per_tok": 2}, ["q_proj", "v_proj"]),
    "mistral_window": ("Mistral", {}, ["q_proj", "v_proj"]),  # a sliding window (longer than any sequence here)
    "cohere": ("Cohere", {"logit_scale": 0.25, "tie_word_embeddings": False}, ["q_proj", "v_proj"]),  # scaled logits
    "exaone4": ("Exaone4", {"sliding_window": 4096, "sliding_window_pattern": 2}, ["q_proj", "v_proj"]),  # mixed
    "glm4": ("Glm4", {"head_dim": 16}, ["q_proj", "v_proj"]),
    "helium": ("Helium", {"head_dim": 16}, ["q_proj", "v_proj"]),
    "olmo": ("Olmo", {}, ["q_proj", "v_proj"]),
    "seed_oss": ("SeedOss", {"head_dim": 16}, ["q_proj", "v_proj"]),
    "smollm3": ("SmolLM3", {"tie_word_embeddings": False}, ["q_proj", "v_proj"]),  # layers without rotary embedding
    # through their forward
    "gemma2": ("Gemma2", {"head_dim": 16, "sliding_window": 4096, "final_logit_softcapping": 2.0},
               ["q_proj", "v_proj"]),  # soft-capped logits (a cap low enough to matter here)
    "gpt_neox": ("GPTNeoX", {}, ["query_key_value"]),  # other module names, parallel residual
    "granite": ("Granite", {"logits_scaling": 4.0, "embedding_multiplier": 2.0}, ["q_proj", "v_proj"]),  # divided
    "stablelm": ("StableLm", {}, ["q_proj", "v_proj"]),  # its layers pass no keyword arguments on to attention
    "deepseek_v3": ("DeepseekV3", {"num_key_value_heads": 4, "moe_intermediate_size": 32, "n_routed_experts": 4,
                                   "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
                                   "kv_lora_rank": 16, "q_lora_rank": None, "qk_rope_head_dim": 8,
                                   "qk_nope_head_dim": 16, "v_head_dim": 16},
                    ["q_proj", "kv_b_proj"]),  # latent attention: keys and values of different head sizes
    "gptj": ("GPTJ", {"rotary_dim": 8}, ["q_proj", "v_proj"]),  # rotary on part of each head
}
THROUGH_FORWARD = ("gemma2", "gpt_neox", "granite", "stablelm", "deepseek_v3", "gptj")


def other_model(arch: str, trigger_mode: str = "always") -> MemGenModel:
    """A tiny random model of `arch` (`weaving_model`)."""
    prefix, extra, targets = ARCHITECTURES[arch]
    return named_model(f"{prefix}Config", f"{prefix}ForCausalLM", targets, trigger_mode, **{**TINY_FIELDS, **extra})


def named_model(config_name: str, model_name: str, targets: list[str], trigger_mode: str = "always",
                **fields) -> MemGenModel:
    """`weaving_model` on a random transformers `model_name` built from `config_name`(**fields) and the chat
    tokenizer's vocabulary."""
    config_class = skip_unless_buildable(getattr(transformers, config_name))
    tok = chat_tokenizer()
    config = config_class(**fields, vocab_size=len(tok))
    torch.manual_seed(0)
    return weaving_model(getattr(transformers, model_name)(config), tok, targets, trigger_mode)


def skip_unless_buildable(config_class):
    """`config_class`, or a skip where this transformers cannot build it with its own defaults (5.4's Olmo2Config and
    Cohere2Config fail huggingface_hub's type checks on them)."""
    try:
        config_class()
    except Exception as err:
        pytest.skip(f"this transformers cannot build a {config_class.__name__} with its own defaults: {err}")
    return config_class


# the shape every tiny model here shares
TINY_FIELDS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, pad_token_id=None, bos_token_id=None,
                   eos_token_id=None)


def weaving_model(reasoner, tok, targets: list[str], trigger_mode: str = "always", trigger_base=None) -> MemGenModel:
    """A MemGen model on `reasoner` (LoRA on `targets`; the trigger's on `trigger_base` when given) whose LM head
    favours delimiters (so that generation weaves) and whose adapters matter (LoRA B starts at zero)."""
    lora = {"lora_dropout": 0.0, "target_modules": targets}
    model = MemGenModel.from_reasoner(reasoner.eval(), tok, MemGenConfig(
        prompt_latents_len=3, inference_latents_len=2, max_inference_aug_num=4, trigger_mode=trigger_mode,
        weaver_lora=lora, trigger_lora=lora), trigger_base=trigger_base).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for stage in ("weaver", "trigger"):
            for name, p in model.stage_parameters(stage).items():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.reasoner.get_output_embeddings().weight[model.delimiter_table.nonzero().flatten()] *= 2.5
        if model.trigger is not None:
            model.trigger.output_layer.weight.normal_(0, 1.0, generator=g)
    return model


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("trigger_mode", ["always", "lora"])
def test_greedy_generation_equals_the_reference(arch, trigger_mode):
    model = other_model(arch, trigger_mode)
    assert (direct_call(model.reasoner.get_decoder()) is None) == (arch in THROUGH_FORWARD)
    input_ids, mask, _ = make_batch(model, [0] * 3, "left", seed=4)
    out = assert_same_as_reference(model, input_ids, mask, max_new_tokens=24)
    assert (out.augmentation_mask[:, 1:] == 1).any(), "some row should weave after its prompt"


def test_a_trigger_on_its_own_base_reads_that_base_s_embeddings():
    """A `lora` trigger on a base of its own makes calls of its own, which embed the tokens through that base's
    embedding module: Gemma's scales its rows (the engine had read the raw rows, and decided otherwise)."""
    prefix, extra, targets = ARCHITECTURES["gemma2"]
    tok = chat_tokenizer()

    def base(seed):
        torch.manual_seed(seed)
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**TINY_FIELDS, vocab_size=len(tok), **extra))

    model = weaving_model(base(0), tok, targets, "lora", trigger_base=base(1))
    assert model.trigger.model is not model.reasoner
    input_ids, mask, _ = make_batch(model, [0] * 5, "left", seed=0)
    out = assert_same_as_reference(model, input_ids, mask, max_new_tokens=32)
    assert (out.augmentation_mask[:, 1:] == 0).any() and (out.augmentation_mask[:, 1:] == 1).any()


@pytest.mark.parametrize("trigger_mode", ["always", "lora"])
def test_gemma2_loaded_with_flash_attention_decodes_through_eager_attention(trigger_mode, monkeypatch):
    """Gemma 2 soft-caps its attention scores, which flash attention and eager attention do and SDPA refuses to: the
    engine's calls (whose masks flash attention would misread) run under eager attention."""
    prefix, extra, targets = ARCHITECTURES["gemma2"]
    model = named_model("Gemma2Config", "Gemma2ForCausalLM", targets, trigger_mode,
                        **{**TINY_FIELDS, **extra, "attn_logit_softcapping": 1e-3})  # a cap low enough to matter
    monkeypatch.setattr(model.reasoner.get_decoder().config, "_attn_implementation", "eager")  # 5.4 defaults to SDPA
    input_ids, mask, _ = make_batch(model, [0] * 3, "left", seed=4)
    want_seq, want_mask = reference_generate(model, input_ids, mask, max_new_tokens=24)
    attentions = [m for m in model.reasoner.modules() if getattr(m, "attn_logit_softcapping", None) is not None]
    with monkeypatch.context() as uncapped:
        for attention in attentions:
            uncapped.setattr(attention, "attn_logit_softcapping", None)
        assert not torch.equal(reference_generate(model, input_ids, mask, max_new_tokens=24)[0], want_seq), \
            "the cap should change the tokens"
    loaded_with_attention(model, "flash_attention_2", trigger_mode, monkeypatch)
    out = model.generate(input_ids, mask, max_new_tokens=24, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want_seq) and torch.equal(out.augmentation_mask, want_mask)
    assert (out.augmentation_mask[:, 1:] == 1).any()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_forward_equals_the_reference(arch):
    model = other_model(arch)
    input_ids, mask, labels = make_batch(model, [2, 0, 4], "right", seed=5)
    out = assert_matches_reference(model, input_ids, mask, labels)
    assert (out.augmentation_points != 0).sum() == 3 + 2 + 4


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "cohere", "granite"])
def test_logits_are_the_models_own(arch):
    """The reasoner's logits, in generation and in the training forward, are those of the model's own forward: the
    output embedding, then whatever its architecture does to them (soft cap, scale, divisor)."""
    model = other_model(arch)
    reasoner = model.reasoner
    input_ids, mask, _ = make_batch(model, [1, 3], "right", seed=6)
    with torch.no_grad():
        want = reasoner(input_ids, attention_mask=mask).logits
        hidden = reasoner.get_decoder()(input_ids, attention_mask=mask).last_hidden_state
        assert torch.equal(logits_function(reasoner)(hidden), want)
        got = model(input_ids, mask, memory=False).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    if arch != "mistral":  # the transform changes the distribution a sampler draws from
        assert not torch.allclose(reasoner.get_output_embeddings()(hidden)[real], want[real], atol=1e-3)


def test_sampling_draws_from_the_models_own_logits():
    """The engine samples from the logits of the model's own forward (Cohere scales them by 1/4 here, a higher
    temperature): its first token is the draw those logits give for the generator's uniform."""
    model = other_model("cohere")
    input_ids, mask, _ = make_batch(model, [0], "left", seed=7)
    input_ids, mask = input_ids.expand(64, -1), mask.expand(64, -1)
    out = model.generate(input_ids, mask, max_new_tokens=1, do_sample=True, memory=False,
                         generator=torch.Generator().manual_seed(3))
    uniforms = torch.rand(64, 1, generator=torch.Generator().manual_seed(3))[:, 0]  # the engine's first draw

    def drawn(logits):
        cumulative = torch.softmax(logits.float(), -1).cumsum(-1)
        point = (uniforms * cumulative[:, -1]).clamp(min=torch.finfo(cumulative.dtype).tiny)
        return torch.searchsorted(cumulative, point[:, None]).squeeze(-1)

    with torch.no_grad():
        own = model.reasoner(input_ids, attention_mask=mask).logits[:, -1]
        hidden = model.reasoner.get_decoder()(input_ids, attention_mask=mask).last_hidden_state[:, -1]
    assert torch.equal(out[:, -1], drawn(own))
    assert not torch.equal(drawn(model.reasoner.get_output_embeddings()(hidden)), drawn(own))


def gemma3_multimodal(trigger_mode: str) -> MemGenModel:
    """A tiny `Gemma3ForConditionalGeneration` (what `AutoModelForCausalLM` loads for a Gemma 3 checkpoint of 4B and
    up): a vision tower whose attention projections bear the names LoRA targets in its language model."""
    tok = chat_tokenizer()
    config = transformers.Gemma3Config(
        text_config=dict(TINY_FIELDS, vocab_size=len(tok), head_dim=16, sliding_window=8, final_logit_softcapping=2.0,
                         layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14))
    torch.manual_seed(0)
    reasoner = transformers.AutoModelForCausalLM.from_config(config)
    assert type(reasoner).__name__ == "Gemma3ForConditionalGeneration"
    return weaving_model(reasoner, tok, ["q_proj", "v_proj"], trigger_mode)


@pytest.mark.parametrize("trigger_mode", ["always", "lora", "head"])
def test_a_multimodal_model_s_language_part_is_the_reasoner(trigger_mode):
    """Sizes come from its text config, adapters go to its language decoder only, and generation (past the
    8-position sliding window) and the training forward equal the reference."""
    model = gemma3_multimodal(trigger_mode)
    adapters = [name for stage in ("weaver", "trigger") for name in model.stage_parameters(stage) if ".lora_" in name]
    assert adapters and all(".language_model." in name for name in adapters)
    input_ids, mask, _ = make_batch(model, [0] * 3, "left", seed=4)
    out = assert_same_as_reference(model, input_ids, mask, max_new_tokens=24)
    assert (out.augmentation_mask[:, 1:] == 1).any()
    input_ids, mask, labels = make_batch(model, [3, 0, 5], "right", seed=5)
    assert_matches_reference(model, input_ids, mask, labels)


def test_a_multimodal_model_s_logits_are_its_own():
    model = gemma3_multimodal("always")
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.reasoner(input_ids=ids).logits
        got = logits_function(model.reasoner)(model.reasoner.get_decoder()(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(got, want)  # (this forward does not soft-cap; Gemma3ForCausalLM's does)
