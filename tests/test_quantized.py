"""A reasoner quantized by bitsandbytes (8-bit and 4-bit, on the CPU here): the adapters go on its quantized layers
(PEFT's bitsandbytes LoRA layers, which the engine's shared LoRA products leave to their own forward), the training
forward gives the weaver gradients, and generation equals the reference."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from memgen import MemGenConfig, MemGenModel, build_delimiter_table
from offline import chat_tokenizer, tiny_causal_lm
from test_generation import assert_same_as_reference
from test_modeling import make_batch

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")  # bitsandbytes: 8-bit matmuls cast to float16

QUANTIZATIONS = {"8bit": dict(load_in_8bit=True),
                 "4bit": dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")}


@pytest.fixture(scope="module")
def saved_reasoner(tmp_path_factory):
    """A tiny reasoner whose LM head favours delimiters (so that generation reaches decision points), on disk."""
    path = tmp_path_factory.mktemp("reasoner")
    tok = chat_tokenizer()
    reasoner = tiny_causal_lm("qwen2", len(tok))
    with torch.no_grad():
        reasoner.get_output_embeddings().weight[build_delimiter_table(tok).nonzero().flatten()] *= 2.5
    reasoner.save_pretrained(path)
    return path


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("trigger_mode", ["always", "lora", "head"])
def test_a_quantized_reasoner_trains_and_generates_as_the_reference(saved_reasoner, quantization, trigger_mode):
    reasoner = AutoModelForCausalLM.from_pretrained(
        saved_reasoner, quantization_config=BitsAndBytesConfig(**QUANTIZATIONS[quantization]), device_map="cpu")
    tok = chat_tokenizer()
    config = MemGenConfig(prompt_latents_len=3, inference_latents_len=2, max_inference_aug_num=4,
                          trigger_mode=trigger_mode, weaver_lora={"lora_dropout": 0.0},
                          trigger_lora={"lora_dropout": 0.0})
    model = MemGenModel.from_reasoner(reasoner, tok, config)
    assert "bnb" in type(model.reasoner.model.layers[0].self_attn.q_proj).__module__  # PEFT's quantized LoRA layer
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adapters that matter, a trigger that both invokes and skips
        for name, p in [*model.stage_parameters("weaver").items(), *model.stage_parameters("trigger").items()]:
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if model.trigger is not None:
            model.trigger.output_layer.weight.normal_(0, 1.0, generator=g)
    input_ids, mask, labels = make_batch(model, [2, 0, 3, 1], "left", seed=3)

    # training first: bitsandbytes 0.50 repacks 4-bit weights for CPU inference once they run in eval mode, and its
    # repacked path then fails under autograd (plain PEFT too; see README, Limitations)
    model.train()
    model(input_ids, mask, labels).loss.backward()
    grads = [p.grad for p in model.stage_parameters("weaver").values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)

    model.eval()
    out = assert_same_as_reference(model, input_ids, mask, max_new_tokens=24)
    assert (out.augmentation_mask[:, 1:] == 1).any()  # inference weaves happened, not only the prompt's
