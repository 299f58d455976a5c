"""Presets: the tiny trained model emits delimiters at a realistic rate; shape-only presets match
the published configs; bad names raise."""

from __future__ import annotations

import pytest
import torch

from memgen import MemGenConfig, MemGenModel, presets


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMGEN_CACHE", str(tmp_path_factory.mktemp("cache")))
        state = torch.random.get_rng_state()
        reasoner, tokenizer = presets.load_preset("tiny")  # trained here, into the empty cache
        generator_left_alone = torch.equal(torch.random.get_rng_state(), state)
        assert presets.tiny_path().joinpath("config.json").is_file()
        again, _ = presets.load_preset("tiny")  # from the cache, not trained again
    return reasoner, tokenizer, again, generator_left_alone


def test_training_the_tiny_preset_leaves_the_callers_generator_alone(tiny):
    assert tiny[3]


def test_synthetic_text_is_punctuated():
    text = presets.synthetic_text(200, seed=1)
    assert text.count(".") >= 200 and "," in text and "\n" in text
    assert presets.synthetic_text(200, seed=1) == text


def test_tiny_model_emits_delimiters_at_a_realistic_rate_and_weaves(tiny):
    reasoner, tokenizer, again, _ = tiny
    assert all(torch.equal(a, b) for a, b in zip(reasoner.state_dict().values(), again.state_dict().values()))
    model = MemGenModel.from_reasoner(reasoner, tokenizer, MemGenConfig()).eval()
    prompts = tokenizer(["The model reads", "A user checks the sum,", "Each step"], return_tensors="pt",
                        padding=True, padding_side="left")
    out = model.generate(prompts["input_ids"], prompts["attention_mask"], max_new_tokens=120, do_sample=True,
                         generator=torch.Generator().manual_seed(0), return_dict_in_generate=True)
    new = out.sequences[:, prompts["input_ids"].shape[1]:]
    rate = model.delimiter_table[new].float().mean().item()
    assert 1 / 20 <= rate <= 1 / 4, rate
    assert ((out.augmentation_mask[:, 1:] == 1).sum(1) >= 1).all(), "every row weaves inference memory"


def test_shape_presets_match_the_published_configs():
    model, tokenizer = presets.load_preset("qwen2.5-1.5b", device="meta", dtype=torch.bfloat16)
    assert tokenizer is None
    n = sum(p.numel() for p in model.parameters())
    assert 1.5e9 < n < 1.6e9 and model.config.num_hidden_layers == 28 and model.config.hidden_size == 1536


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset must be one of"):
        presets.load_preset("huge")


def test_a_random_weight_preset_is_the_same_every_time_and_leaves_the_callers_generator_alone():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first, _ = presets.load_preset("small")
    assert torch.equal(torch.random.get_rng_state(), state)
    second, _ = presets.load_preset("small")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
