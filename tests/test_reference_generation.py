"""The reference generation: consistent with the training forward, with Hugging Face decoding, and with itself."""

from __future__ import annotations

import pytest
import torch

from memgen.points import default_points
from memgen.reference import reference_generate
from test_modeling import make_batch, make_model


def chatty_model(arch="qwen2", trigger_mode="always", boost=2.5, **kwargs):
    """A tiny model whose LM head favours delimiter tokens, so that generation reaches decision points."""
    model = make_model(arch, trigger_mode=trigger_mode, **kwargs)
    with torch.no_grad():
        weight = model.reasoner.get_output_embeddings().weight
        weight[model.delimiter_table.nonzero().flatten()] *= boost
        if model.trigger is not None:  # a trigger that both invokes and skips
            model.trigger.output_layer.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(6)
        for name, p in model.stage_parameters("trigger").items():  # LoRA B starts at zero: make the adapter matter
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def teacher_forcing_inputs(model, prompt_ids, prompt_mask, sequences, aug_mask):
    """The generated rows as a training batch: labels on the new tokens up to each row's first EOS."""
    length = prompt_ids.shape[1]
    new = sequences[:, length:]
    eos = model.tokenizer.eos_token_id
    real_new = torch.ones_like(new, dtype=torch.bool)
    for b in range(new.shape[0]):
        hits = (new[b] == eos).nonzero()
        if hits.numel():
            real_new[b, hits[0, 0] + 1:] = False
    mask = torch.cat([prompt_mask.bool(), real_new], 1)
    labels = torch.cat([torch.full_like(prompt_ids, -100), torch.where(real_new, new, -100)], 1)
    points = torch.cat([torch.zeros_like(prompt_ids), torch.where(real_new, aug_mask, -100)], 1)
    return mask.long(), labels, points


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("trigger_mode", ["always", "lora", "head"])
def test_teacher_forcing_a_generation_reproduces_it(arch, trigger_mode):
    model = chatty_model(arch, trigger_mode)
    prompt_ids, prompt_mask, _ = make_batch(model, [0, 0, 0], "left", seed=2)
    sequences, aug = reference_generate(model, prompt_ids, prompt_mask, max_new_tokens=24)
    assert (aug == 1).any(), "the test needs insertions"
    if trigger_mode != "always":
        assert (aug == 0).any(), "the trigger should also skip somewhere"
    mask, labels, points = teacher_forcing_inputs(model, prompt_ids, prompt_mask, sequences, aug)
    out = model(sequences, mask, labels, augmentation_points=points)
    predicted = out.logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    answer = target != -100
    assert torch.equal(predicted[answer], target[answer])
    if trigger_mode == "always":  # every decision point invoked: the training rule finds the same points
        rule = default_points(sequences, mask.bool(), labels, model.delimiter_table, 1, 4)
        assert torch.equal(rule != 0, points == 1)


def test_memory_off_equals_hugging_face_greedy_decoding():
    model = chatty_model("llama")
    prompt_ids, prompt_mask, _ = make_batch(model, [0, 0], "left", seed=4)
    ours, aug = reference_generate(model, prompt_ids, prompt_mask, max_new_tokens=12, memory=False)
    assert (aug == -100).all()
    tok = model.tokenizer
    theirs = model.reasoner.generate(prompt_ids, attention_mask=prompt_mask, max_new_tokens=12, do_sample=False,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert torch.equal(ours, theirs[:, :ours.shape[1]])


def test_budgets_and_prompt_switch():
    model = chatty_model("qwen2", max_prompt=1, max_inference=2)
    prompt_ids, prompt_mask, _ = make_batch(model, [0, 0], "left", seed=6)
    _, aug = reference_generate(model, prompt_ids, prompt_mask, max_new_tokens=20)
    assert (aug[:, 0] == 1).all() and ((aug[:, 1:] == 1).sum(1) == 2).all()
    _, aug = reference_generate(model, prompt_ids, prompt_mask, max_new_tokens=20, max_prompt_aug_num=0,
                                max_inference_aug_num=0)
    assert (aug == -100).all()


def test_sampling_is_reproducible_with_a_generator():
    model = chatty_model("qwen2", trigger_mode="lora")
    prompt_ids, prompt_mask, _ = make_batch(model, [0, 0, 0], "left", seed=8)
    runs = [reference_generate(model, prompt_ids, prompt_mask, max_new_tokens=16, do_sample=True, temperature=0.9,
                               top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(seed))
            for seed in (1, 1, 2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])


def test_rows_stop_at_eos_and_pad_afterwards():
    model = chatty_model("qwen2", boost=1.0)
    eos = model.tokenizer.eos_token_id
    assert model.tokenizer.pad_token_id != eos
    with torch.no_grad():  # make EOS likely after a few steps
        model.reasoner.get_output_embeddings().weight[eos] *= 4
    prompt_ids, prompt_mask, _ = make_batch(model, [0, 0, 0, 0], "left", seed=9)
    sequences, aug = reference_generate(model, prompt_ids, prompt_mask, max_new_tokens=30)
    new = sequences[:, prompt_ids.shape[1]:]
    finished = 0
    for b in range(new.shape[0]):
        hits = (new[b] == eos).nonzero().flatten()
        if hits.numel():
            finished += 1
            after = slice(int(hits[0]) + 1, None)
            assert (new[b, after] == model.tokenizer.pad_token_id).all() and (aug[b, after] == -100).all()
    assert finished > 0
