"""Decoders the engine cannot drive are refused before any work; untested ones that it can are probed once."""

from __future__ import annotations

import pytest
import torch
import transformers

from memgen import compatibility, generation
from memgen.compatibility import TESTED_DECODERS, check_engine_support
from memgen.reference import reference_generate
from offline import chat_tokenizer
from test_architectures import TINY_FIELDS, named_model
from test_generation import loaded_with_attention
from test_modeling import make_batch


UNSUPPORTED = {
    # learned absolute positions, counted from the cache's length
    "opt": ("OPTConfig", "OPTForCausalLM", ["q_proj", "v_proj"],
            dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64)),
    # ALiBi
    "bloom": ("BloomConfig", "BloomForCausalLM", ["query_key_value"], dict(hidden_size=64, n_layer=2, n_head=4)),
}


@pytest.mark.parametrize("arch", UNSUPPORTED)
def test_a_decoder_the_engine_cannot_drive_is_refused_before_any_work(arch, monkeypatch):
    config_name, model_name, targets, fields = UNSUPPORTED[arch]
    model = named_model(config_name, model_name, targets, **fields)
    input_ids, mask, _ = make_batch(model, [0, 0], "left", seed=1)

    def engine(*args, **kwargs):
        raise AssertionError("the engine ran")

    monkeypatch.setattr(generation, "generate", engine)
    name = type(model.reasoner.get_decoder()).__name__
    with pytest.raises(ValueError, match=rf"cannot drive the reasoner's decoder {name}: a ragged call raised"):
        model.generate(input_ids, mask, max_new_tokens=4)
    model(*make_batch(model, [2, 1], "right", seed=2))  # the training forward runs the decoder's own forward


@pytest.mark.parametrize("attention", ["sdpa", "flash_attention_2"])
@pytest.mark.parametrize("trigger_mode", ["always", "lora"])
def test_an_untested_decoder_that_passes_the_probe_generates_like_the_reference(trigger_mode, attention,
                                                                               monkeypatch):
    """Also when the model was loaded with flash attention: the probe, like the engine, runs under SDPA."""
    model = named_model("PersimmonConfig", "PersimmonForCausalLM", ["query_key_value"], trigger_mode, **TINY_FIELDS)
    assert type(model.reasoner.get_decoder()).__name__ not in TESTED_DECODERS
    input_ids, mask, _ = make_batch(model, [0] * 3, "left", seed=4)
    want_seq, want_mask = reference_generate(model, input_ids, mask, max_new_tokens=24)
    if attention != "sdpa":
        loaded_with_attention(model, attention, trigger_mode, monkeypatch)
    probes = []
    probe = compatibility._probe
    monkeypatch.setattr(compatibility, "_probe", lambda *args: probes.append(args) or probe(*args))
    out = model.generate(input_ids, mask, max_new_tokens=24, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want_seq) and torch.equal(out.augmentation_mask, want_mask)
    assert (out.augmentation_mask[:, 1:] == 1).any()
    model.generate(input_ids, mask, max_new_tokens=4)
    assert len(probes) == 1, "one probe per decoder"


class _RowMixingLlamaModel(transformers.LlamaModel):
    """A decoder whose rows leak into each other: alone a row gives other hidden states than beside another."""

    def forward(self, inputs_embeds=None, **kwargs):
        return super().forward(inputs_embeds=inputs_embeds + inputs_embeds.mean(0, keepdim=True), **kwargs)


def test_a_decoder_whose_ragged_rows_differ_from_their_own_is_refused():
    tok = chat_tokenizer()
    config = transformers.LlamaConfig(**TINY_FIELDS, vocab_size=len(tok))
    reasoner = transformers.LlamaForCausalLM(config)
    reasoner.model = _RowMixingLlamaModel(config)
    with pytest.raises(ValueError, match=r"a row's hidden states differ from the row's alone \(relative difference"):
        check_engine_support(reasoner, "reasoner")


def test_tested_decoders_are_not_probed(monkeypatch):
    monkeypatch.setattr(compatibility, "_probe", lambda *args: pytest.fail("probed"))
    model = named_model("Qwen2Config", "Qwen2ForCausalLM", ["q_proj", "v_proj"], **TINY_FIELDS)
    input_ids, mask, _ = make_batch(model, [0, 0], "left", seed=1)
    model.generate(input_ids, mask, max_new_tokens=4)


def test_the_probe_gives_each_submodule_its_own_mode_back():
    """A user training with some parts frozen in eval mode keeps them so: the probe runs the decoder in eval mode
    and then restores every submodule's mode, not the decoder's mode everywhere."""
    model = named_model("PersimmonConfig", "PersimmonForCausalLM", ["query_key_value"], **TINY_FIELDS)
    decoder = model.reasoner.get_decoder()
    decoder.train()
    frozen = decoder.layers[0]
    frozen.eval()
    check_engine_support(model.reasoner, "reasoner")
    assert compatibility._verdicts[decoder] is None, "the probe ran and passed"
    assert decoder.training and decoder.layers[1].training and not any(sub.training for sub in frozen.modules())
