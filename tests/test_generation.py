"""The decoding engine equals the reference generation, token for token and decision for decision."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, GenerationConfig, MinPLogitsWarper, Qwen2Config, Qwen2ForCausalLM

from memgen import MemGenConfig, MemGenModel, generation, generation_kwargs, nearest_tokens
from memgen.attention import RaggedGroups
from memgen.bench.decode_suite import weaver_calls
from memgen.generation import completion_mask
from memgen.reference import reference_choose_token, reference_generate
from memgen.sharding import gathered_for_decoding
from offline import chat_tokenizer, tiny_causal_lm
from test_modeling import make_batch, make_model
from test_reference_generation import chatty_model


@pytest.fixture(params=["device default", "joint weaver", "always packed, joint weaver", "weaver's own calls"])
def packing(request, monkeypatch):
    """The engine's layouts and schedules: the CPU's (one batch row per item, the weaver in the reasoner's calls
    for `always` only); the weaver in the reasoner's calls in every mode, with one batch row per item or per row
    (as on a GPU); the weaver in calls of its own, one batch row per item."""
    if "joint weaver" in request.param:
        monkeypatch.setitem(generation.JOINT_WEAVER_MODES, "cpu", ("always", "head", "lora"))
    if "always packed" in request.param:
        monkeypatch.setitem(generation.PACKED_PADDING_ITEMS, "cpu", 10**9)
    if request.param == "weaver's own calls":
        monkeypatch.setitem(generation.JOINT_WEAVER_MODES, "cpu", ())
    return request.param


def assert_same_as_reference(model, input_ids, mask, **kwargs):
    want_seq, want_mask = reference_generate(model, input_ids, mask, **kwargs)
    out = model.generate(input_ids, mask, return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, want_seq), (out.sequences[:, input_ids.shape[1]:], want_seq[:, input_ids.shape[1]:])
    assert torch.equal(out.augmentation_mask, want_mask), (out.augmentation_mask, want_mask)
    return out


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("trigger_mode", ["always", "lora", "head"])
def test_greedy_equals_reference(arch, trigger_mode, packing):
    model = chatty_model(arch, trigger_mode)
    input_ids, mask, _ = make_batch(model, [0] * 5, "left", seed=3)
    out = assert_same_as_reference(model, input_ids, mask, max_new_tokens=32)
    invoked = (out.augmentation_mask == 1).sum(1)
    assert (invoked > 0).sum() >= 3, "most rows should weave"
    if trigger_mode != "always":
        assert (out.augmentation_mask == 0).any()


@pytest.mark.parametrize("batch,k,budget,padding", [(1, 1, 0, "left"), (2, 4, 3, "right"), (16, 8, 5, "left")])
def test_batches_budgets_and_latent_counts(batch, k, budget, padding, packing):
    model = chatty_model("qwen2", "always", k_prompt=k, k_inference=k, max_inference=budget)
    input_ids, mask, _ = make_batch(model, [0] * batch, padding, seed=batch)
    out = assert_same_as_reference(model, input_ids, mask, max_new_tokens=24)
    assert ((out.augmentation_mask[:, 1:] == 1).sum(1) <= budget).all()


@pytest.mark.parametrize("trigger_mode", ["always", "lora", "head"])
def test_spent_budgets_end_the_triggers_work(trigger_mode, monkeypatch):
    """Once every row has spent its inference budget, steps are plain: no trigger scoring, no trigger calls,
    and the weaver's stream is no longer written; the output still equals the reference's."""
    model = chatty_model("qwen2", trigger_mode, boost=1.6 if trigger_mode == "always" else 2.5, max_inference=1)
    if trigger_mode == "lora":
        with torch.no_grad():  # a trigger that mostly invokes: every row spends its budget early
            model.trigger.output_layer.weight.mul_(0.1)
            model.trigger.output_layer.bias.copy_(torch.tensor([0.0, 3.0]))
    input_ids, mask, _ = make_batch(model, [0] * 3, "left", seed=4)
    calls = []
    scoring = generation.trigger_scoring
    monkeypatch.setattr(generation, "trigger_scoring", lambda *a, **k: calls.append(len(calls)) or scoring(*a, **k))
    out = assert_same_as_reference(model, input_ids, mask, max_new_tokens=60)
    spent = (out.augmentation_mask[:, 1:] == 1).any(1)
    assert spent.all(), "every row should spend its budget of 1"
    last_point = int(torch.where(out.augmentation_mask[:, 1:] >= 0, torch.arange(59), -1).max())
    assert last_point < 50  # the rest of the generation had no decision point left
    # prompt step + one scoring per step up to the last decision point
    assert len(calls) <= last_point + 2


class Streamed:
    """A streamer that keeps nothing (a streamer keeps every row at the same step)."""

    def put(self, value):
        pass

    def end(self):
        pass


@pytest.mark.parametrize("schedule", ["run ahead", "run ahead, joint weaver", "in step"])
def test_the_lora_trigger_reads_its_tokens_in_the_reasoners_calls(schedule, monkeypatch):
    """The `lora` trigger, an adapter on the reasoner's base, adds no decoder call: a step is one call (the
    reasoner's token and the trigger's), plus the weaver's where some row weaves. Rows that weave read their
    latents in the next step's call, beside the others' tokens, and fall a step behind: the calls that read
    tokens go on for one step more per weave of the row that wove most. With the weaver's reads in the reasoner's
    calls too, a weave holds its row back two steps and the weaver makes no call of its own after the prompt's.
    Kept in step (a streamer), the latents take a call of their own per weaving step."""
    if schedule == "run ahead, joint weaver":
        monkeypatch.setitem(generation.JOINT_WEAVER_MODES, "cpu", ("lora",))
    model = chatty_model("qwen2", "lora")
    input_ids, mask, _ = make_batch(model, [0] * 4, "left", seed=3)
    streamer = Streamed() if schedule == "in step" else None
    out = assert_same_as_reference(model, input_ids, mask, max_new_tokens=32)
    assert not (out.sequences == model.tokenizer.eos_token_id).any()
    calls, weaves = [], []
    hook = model.reasoner.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    weave = generation._Engine.weave
    monkeypatch.setattr(generation._Engine, "weave", lambda *a, **k: weaves.append(1) or weave(*a, **k))
    again = model.generate(input_ids, mask, max_new_tokens=32, streamer=streamer, return_dict_in_generate=True)
    hook.remove()
    assert torch.equal(again.sequences, out.sequences) and torch.equal(again.augmentation_mask, out.augmentation_mask)
    inference_weaves = (out.augmentation_mask[:, 1:] == 1).sum(1)
    prompt_weaves = int((out.augmentation_mask[:, 0] == 1).any())
    assert inference_weaves.min() >= 1 and (out.augmentation_mask == 0).any()
    in_step = schedule == "in step"
    assert len(weaves) == weaver_calls(out.augmentation_mask, "lora", in_step=in_step)
    weaving_columns = int((out.augmentation_mask == 1).any(0).sum())
    if in_step:
        assert len(weaves) == weaving_columns
        # the prompts, then a call per later token, then (weaver, latents) per weaving step
        assert len(calls) == 32 + 2 * weaving_columns
    elif schedule == "run ahead":
        assert len(weaves) < int(inference_weaves.sum()) + prompt_weaves  # rows weave together
        assert len(weaves) != weaving_columns  # rows fell behind: a weave's column is not its step
        # the prompts (and the prompt latents), a call per later token and step lost, the weaver's calls
        assert len(calls) == 1 + prompt_weaves + 31 + int(inference_weaves.max()) + len(weaves)
    else:
        assert len(weaves) == prompt_weaves
        # the prompts, the prompt weave and its latents, a call per later token and two per weave of the row that
        # wove most
        assert len(calls) == 1 + 2 * prompt_weaves + 31 + 2 * int(inference_weaves.max())


@pytest.mark.parametrize("trigger_mode", ["always", "head", "lora"])
def test_every_schedule_weaves_what_the_reference_weaves(trigger_mode, monkeypatch):
    """The weaver reads the same items (the delimiter among them) in calls of its own, in the reasoner's calls
    and with rows in step: the same latents (their norms) and tokens, the reference's. Its input projection is
    scaled up so that each item it reads moves the latents (a tiny random weaver is led by its queries)."""
    model = chatty_model("qwen2", trigger_mode)
    with torch.no_grad():
        model.reasoner_to_weaver.weight.mul_(30)
    input_ids, mask, _ = make_batch(model, [0] * 4, "left", seed=12)
    runs = {}
    for schedule, joint, streamer in (("joint", ("always", "head", "lora"), None), ("own", (), None),
                                      ("in step", (), Streamed())):
        monkeypatch.setitem(generation.JOINT_WEAVER_MODES, "cpu", joint)
        runs[schedule] = model.generate(input_ids, mask, max_new_tokens=24, streamer=streamer,
                                        return_dict_in_generate=True)
    assert_same_as_reference(model, input_ids, mask, max_new_tokens=24)
    woven = runs["own"].augmentation_mask == 1
    assert woven[:, 1:].sum() >= 4
    for schedule in ("joint", "in step"):
        assert torch.equal(runs[schedule].sequences, runs["own"].sequences), schedule
        assert torch.equal(runs[schedule].augmentation_mask, runs["own"].augmentation_mask), schedule
        torch.testing.assert_close(runs[schedule].latent_norms, runs["own"].latent_norms, equal_nan=True,
                                   rtol=1e-5, atol=1e-5, msg=schedule)


@pytest.mark.parametrize("trigger", ["own base", "unsupported layers"])
def test_a_lora_trigger_that_cannot_share_the_reasoners_calls_makes_its_own(trigger, monkeypatch):
    """A trigger on its own base model, or on layers `SplitBatch` does not reproduce, reads through its own
    cache and calls; the output is the same as the reference's."""
    if trigger == "own base":  # a llama trigger beside a qwen2 reasoner
        model = chatty_model("qwen2", "lora", trigger_base=tiny_causal_lm("llama", len(chat_tokenizer()), seed=4))
        assert model.trigger.model is not model.reasoner
    else:
        model = chatty_model("qwen2", "lora")
        monkeypatch.setattr(generation.SplitBatch, "supported", staticmethod(lambda *_: False))
    input_ids, mask, _ = make_batch(model, [0] * 3, "left", seed=3)
    out = assert_same_as_reference(model, input_ids, mask, max_new_tokens=24)
    assert (out.augmentation_mask == 1).any() and (out.augmentation_mask == 0).any()


def test_per_call_overrides_and_a_long_generation():
    model = chatty_model("llama", "lora", boost=1.6)
    input_ids, mask, _ = make_batch(model, [0], "left", seed=5)
    assert_same_as_reference(model, input_ids, mask, max_new_tokens=200)
    assert_same_as_reference(model, input_ids, mask, max_new_tokens=20, trigger_mode="always",
                             max_prompt_aug_num=0, max_inference_aug_num=2)


def test_rows_finish_at_different_times(packing):
    model = chatty_model("qwen2", "always", boost=1.0)
    eos = model.tokenizer.eos_token_id
    with torch.no_grad():
        model.reasoner.get_output_embeddings().weight[eos] *= 4
    input_ids, mask, _ = make_batch(model, [0] * 6, "left", seed=9)
    out = assert_same_as_reference(model, input_ids, mask, max_new_tokens=30)
    stopped = (out.sequences[:, input_ids.shape[1]:] == eos).any(1)
    assert stopped.any(), "some rows should emit EOS (then pad, as the reference does)"


@pytest.mark.parametrize("trigger_mode", ["always", "head", "lora"])
def test_rows_that_fall_behind_finish_and_weave_one_latent(trigger_mode, packing):
    """Rows that wove (and so run behind the others) emit EOS at different steps, with K = 1: each
    latent is one item, read beside the others' tokens. The pad token also ends a row here (as where a
    tokenizer pads with EOS): a row waiting for its latents, which chooses no token, must not end."""
    model = chatty_model("qwen2", trigger_mode, boost=1.3 if trigger_mode == "always" else 2.5, k_prompt=1,
                         k_inference=1)  # `always` rows weave at every delimiter: fewer delimiters
    eos = model.tokenizer.eos_token_id
    with torch.no_grad():
        model.reasoner.get_output_embeddings().weight[eos] *= 4
    input_ids, mask, _ = make_batch(model, [0] * 7, "left", seed=8)
    out = assert_same_as_reference(model, input_ids, mask, max_new_tokens=40,
                                   eos_token_id=[eos, model.tokenizer.pad_token_id])
    new = out.sequences[:, input_ids.shape[1]:]
    assert (new == eos).any(1).sum() >= 2 and not (new == eos).any(1).all()
    assert len(set((out.augmentation_mask[:, 1:] == 1).sum(1).tolist())) > 1


def test_memory_off_equals_hugging_face_generate():
    model = chatty_model("qwen3")
    input_ids, mask, _ = make_batch(model, [0, 0, 0], "left", seed=4)
    ours = model.generate(input_ids, mask, max_new_tokens=16, memory=False, return_dict_in_generate=True)
    tok = model.tokenizer
    theirs = model.reasoner.generate(input_ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert torch.equal(ours.sequences, theirs[:, : ours.sequences.shape[1]])
    assert (ours.augmentation_mask == -100).all()


def test_a_generation_config_decodes_as_hugging_face_does_with_it():
    """generation_kwargs turns a model's GenerationConfig into generate's arguments: with memory off, the same tokens
    as Hugging Face's generate under that config (here greedy, with a repetition penalty and two EOS ids)."""
    model = chatty_model("qwen3")
    input_ids, mask, _ = make_batch(model, [0, 0, 0], "left", seed=4)
    tok = model.tokenizer
    free = model.generate(input_ids, mask, max_new_tokens=16, memory=False)[:, input_ids.shape[1]:]
    second_eos = int(free[0, 5])  # a token some row reaches: the config's second EOS must stop it
    config = GenerationConfig(do_sample=False, repetition_penalty=1.3, eos_token_id=[tok.eos_token_id, second_eos],
                              pad_token_id=tok.pad_token_id, bos_token_id=1, max_length=4096, max_new_tokens=16)
    kwargs = generation_kwargs(config)
    assert kwargs == {"do_sample": False, "repetition_penalty": 1.3,  # no sampling settings: greedy decoding
                      "eos_token_id": [tok.eos_token_id, second_eos], "pad_token_id": tok.pad_token_id,
                      "max_new_tokens": 16}
    ours = model.generate(input_ids, mask, memory=False, **kwargs)
    theirs = model.reasoner.generate(input_ids, attention_mask=mask, generation_config=config)
    assert torch.equal(ours, theirs[:, : ours.shape[1]]) and (ours[:, input_ids.shape[1]:] == second_eos).any()
    sampling = generation_kwargs(GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20))
    assert sampling == {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.0}
    model.generate(input_ids, mask, max_new_tokens=4, generator=torch.Generator().manual_seed(0), **sampling)
    with pytest.raises(ValueError, match=r"sets \['no_repeat_ngram_size', 'num_beams'\], which memgen's generate"):
        generation_kwargs(GenerationConfig(num_beams=4, no_repeat_ngram_size=3))
    with pytest.raises(ValueError, match="must be a transformers.GenerationConfig"):
        generation_kwargs({"do_sample": True})


@pytest.mark.parametrize("memory", [False, True])
def test_min_new_tokens_bars_eos_until_then(memory):
    """As Hugging Face's min_new_tokens (equal to its generate with memory off); with memory, rows running ahead of
    each other are each barred by their own column. A token rows write early serves as a second EOS."""
    model = chatty_model("qwen2", "always")
    input_ids, mask, _ = make_batch(model, [0, 2, 1, 0], "left", seed=9)
    tok, prompt = model.tokenizer, input_ids.shape[1]
    free = model.generate(input_ids, mask, max_new_tokens=24, memory=memory)[:, prompt:]
    stop = int(free[0, 3])
    eos = [tok.eos_token_id, stop]
    early = model.generate(input_ids, mask, max_new_tokens=24, memory=memory, eos_token_id=eos,
                           return_dict_in_generate=True)
    late = model.generate(input_ids, mask, max_new_tokens=24, memory=memory, eos_token_id=eos, min_new_tokens=12,
                          return_dict_in_generate=True)
    ends = early.completion_mask.sum(1)
    assert int(ends.min()) < 12 and int(late.completion_mask.sum(1).min()) >= 12
    new = late.sequences[:, prompt:]
    for row in range(input_ids.shape[0]):
        barred = torch.isin(free[row, :12], torch.tensor(eos)).nonzero()
        same = int(barred[0, 0]) if barred.numel() else 12  # up to the first token the bar took away
        assert torch.equal(new[row, :same], free[row, :same]), row
        assert not torch.isin(new[row, :11], torch.tensor(eos)).any(), row
    if not memory:
        theirs = model.reasoner.generate(input_ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                                         eos_token_id=eos, pad_token_id=tok.pad_token_id, min_new_tokens=12)
        assert torch.equal(late.sequences, theirs[:, : late.sequences.shape[1]])
    assert generation_kwargs(GenerationConfig(min_new_tokens=12))["min_new_tokens"] == 12
    with pytest.raises(ValueError, match="min_new_tokens must be an int >= 0, got -1"):
        model.generate(input_ids, mask, max_new_tokens=4, min_new_tokens=-1)


@pytest.mark.parametrize("memory", [True, False])
def test_min_p_of_one_samples_the_likeliest_token(memory):
    """min_p = 1 keeps only the likeliest token: sampling then decodes greedily, rows running ahead or not."""
    model = chatty_model("qwen2", "always")
    input_ids, mask, _ = make_batch(model, [0, 2, 1], "left", seed=10)
    greedy = model.generate(input_ids, mask, max_new_tokens=20, memory=memory, return_dict_in_generate=True)
    sampled = model.generate(input_ids, mask, max_new_tokens=20, memory=memory, do_sample=True, min_p=1.0,
                             generator=torch.Generator().manual_seed(3), return_dict_in_generate=True)
    assert torch.equal(sampled.sequences, greedy.sequences)
    assert torch.equal(sampled.augmentation_mask, greedy.augmentation_mask)
    loose = model.generate(input_ids, mask, max_new_tokens=20, memory=memory, do_sample=True, min_p=0.0,
                           generator=torch.Generator().manual_seed(3))
    assert not torch.equal(loose, greedy.sequences)  # (and min_p 0 filters nothing)
    for bad in (-0.1, 1.5, "0.1", True):
        with pytest.raises(ValueError, match="min_p must be in \\[0, 1\\]"):
            model.generate(input_ids, mask, max_new_tokens=2, do_sample=True, min_p=bad)
    with pytest.warns(UserWarning, match="min_p"):
        model.generate(input_ids, mask, max_new_tokens=2, min_p=0.2)
    assert generation_kwargs(GenerationConfig(do_sample=True, min_p=0.05))["min_p"] == 0.05
    assert "min_p" not in generation_kwargs(GenerationConfig(do_sample=False, min_p=0.05))


def test_sampling_is_reproducible_and_matches_the_reference_in_distribution():
    model = chatty_model("qwen2", "lora")
    with torch.no_grad():  # P(INVOKE) = 0.5 at every decision point: the uniforms decide
        model.trigger.output_layer.weight.zero_()
        model.trigger.output_layer.bias.zero_()
    input_ids, mask, _ = make_batch(model, [0], "left", seed=6)
    kwargs = dict(max_new_tokens=2, do_sample=True, temperature=1.0, top_k=3)
    runs = [model.generate(input_ids, mask, generator=torch.Generator().manual_seed(s), return_dict_in_generate=True,
                           **kwargs) for s in (1, 1)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    n = 300
    many_ids, many_mask = input_ids.expand(n, -1), mask.expand(n, -1)
    ours = model.generate(many_ids, many_mask, generator=torch.Generator().manual_seed(2),
                          return_dict_in_generate=True, **kwargs)
    ref_seq, ref_mask = reference_generate(model, many_ids, many_mask, generator=torch.Generator().manual_seed(3),
                                           **kwargs)
    length = input_ids.shape[1]

    def frequencies(values):
        keys, counts = values.unique(return_counts=True)
        return dict(zip(keys.tolist(), (counts.float() / values.numel()).tolist()))

    for name, a, b in (("first token", ours.sequences[:, length], ref_seq[:, length]),
                       ("prompt decision", ours.augmentation_mask[:, 0], ref_mask[:, 0])):
        fa, fb = frequencies(a), frequencies(b)
        distance = 0.5 * sum(abs(fa.get(k, 0) - fb.get(k, 0)) for k in set(fa) | set(fb))
        assert distance < 0.12, (name, fa, fb)  # 300 draws of <= 3 outcomes: same law gives ~0.05
    assert 0.4 < float((ours.augmentation_mask[:, 0] == 1).float().mean()) < 0.6


def test_num_return_sequences_samples_each_prompt_in_turn():
    """N samples per prompt are the prompts repeated N times in a row (GRPO's groups), drawn as one batch."""
    model = chatty_model("qwen2", "always")
    input_ids, mask, _ = make_batch(model, [0, 0], "left", seed=12)
    kwargs = dict(max_new_tokens=16, do_sample=True, top_k=5, return_dict_in_generate=True)
    out = model.generate(input_ids, mask, num_return_sequences=3, generator=torch.Generator().manual_seed(4), **kwargs)
    repeated = model.generate(input_ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0),
                              generator=torch.Generator().manual_seed(4), **kwargs)
    assert out.sequences.shape == (6, input_ids.shape[1] + 16)
    for field in ("sequences", "augmentation_mask"):
        assert torch.equal(getattr(out, field), getattr(repeated, field)), field
    assert torch.equal(out.sequences[:, :input_ids.shape[1]], input_ids.repeat_interleave(3, 0))
    assert len({tuple(row) for row in out.sequences[:3, input_ids.shape[1]:].tolist()}) > 1, "samples should differ"


def test_the_sampler_draws_each_token_with_its_probability_and_never_a_filtered_one():
    """A token is the first whose cumulative probability reaches u x total: over evenly spread uniforms each
    token's share is its probability; top-k and top-p filtered tokens and zero-probability ones never come,
    even for the uniforms at the ends of [0, 1)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, generator=g) * 2
    logits[2, 4] = float("-inf")  # probability 0
    n = 20000
    uniforms = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    for row in range(3):
        drawn = generation._choose_tokens(logits[row].expand(n, -1), True, 0.7, None, None, uniforms)
        share = torch.bincount(drawn, minlength=11).float() / n
        assert (share - torch.softmax(logits[row] / 0.7, -1)).abs().max() < 1e-3, row
    ends = torch.tensor([0.0, 1e-30, 0.5, 1 - 2 ** -24])
    zero_first = torch.tensor([[float("-inf"), 1.0, 2.0, float("-inf")]]).expand(4, -1)
    assert set(generation._choose_tokens(zero_first, True, 1.0, None, None, ends).tolist()) <= {1, 2}
    for top_k, top_p, allowed in ((2, None, {9, 10}), (None, 0.5, {10})):
        ordered = torch.arange(11, dtype=torch.float32)[None].expand(n, -1)  # token 10 most likely
        drawn = generation._choose_tokens(ordered, True, 1.0, top_k, top_p, uniforms)
        assert set(drawn.tolist()) == allowed, (top_k, top_p)
    # min-p keeps the tokens at least min_p times as likely as the likeliest, each with its renormalised share,
    # and drops what Hugging Face's MinPLogitsWarper drops
    for row, min_p in ((0, 0.1), (1, 0.3), (2, 0.05)):
        scores = logits[row] / 0.7
        probs = torch.softmax(scores, -1)
        kept = probs >= min_p * probs.max()
        drawn = generation._choose_tokens(logits[row].expand(n, -1), True, 0.7, None, None, uniforms, min_p)
        share = torch.bincount(drawn, minlength=11).float() / n
        assert (share - torch.where(kept, probs, 0) / probs[kept].sum()).abs().max() < 1e-3, row
        theirs = MinPLogitsWarper(min_p)(None, scores[None].clone())[0]
        assert torch.equal(torch.isfinite(theirs), kept), row
        assert {reference_choose_token(logits[row], True, 0.7, None, None, torch.Generator().manual_seed(s), min_p)
                for s in range(200)} <= set(kept.nonzero().flatten().tolist())


@pytest.mark.parametrize("joint", [True, False], ids=["weaver in the reasoner's calls", "weaver's own calls"])
def test_sampling_while_rows_run_ahead(joint, monkeypatch):
    """Sampling where rows that weave fall behind the others: top-k 1 with a saturated `head` trigger is greedy
    decoding, and equals the reference; with real draws, a seed fixes the result, whichever the schedule (a
    streamer keeps the rows in step), for `always` too."""
    monkeypatch.setitem(generation.JOINT_WEAVER_MODES, "cpu", ("always", "head", "lora") if joint else ())
    always = chatty_model("qwen2", "always")
    input_ids, mask, _ = make_batch(always, [0] * 4, "left", seed=11)
    runs = [always.generate(input_ids, mask, max_new_tokens=30, do_sample=True, top_k=5, return_dict_in_generate=True,
                            generator=torch.Generator().manual_seed(7), streamer=streamer)
            for streamer in (None, Streamed())]
    assert (runs[0].augmentation_mask[:, 1:] == 1).any()
    for field in ("sequences", "augmentation_mask"):
        assert torch.equal(getattr(runs[0], field), getattr(runs[1], field)), field
    model = chatty_model("qwen2", "head")
    with torch.no_grad():  # decisions far from P = 0.5: a sampled decision is the greedy one
        model.trigger.output_layer.weight.mul_(50)
    input_ids, mask, _ = make_batch(model, [0] * 4, "left", seed=11)
    want_seq, want_mask = reference_generate(model, input_ids, mask, max_new_tokens=30)
    assert len(set((want_mask[:, 1:] == 1).sum(1).tolist())) > 1, "rows should weave different numbers of times"
    sampled = model.generate(input_ids, mask, max_new_tokens=30, do_sample=True, top_k=1, return_dict_in_generate=True,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled.sequences, want_seq) and torch.equal(sampled.augmentation_mask, want_mask)
    with torch.no_grad():
        model.trigger.output_layer.weight.div_(50)
    runs = [model.generate(input_ids, mask, max_new_tokens=30, do_sample=True, top_k=5, return_dict_in_generate=True,
                           generator=torch.Generator().manual_seed(s), streamer=streamer)
            for s, streamer in ((7, None), (7, Streamed()), (8, None))]
    assert (runs[0].augmentation_mask == 1).any() and (runs[0].augmentation_mask == 0).any()
    for field in ("sequences", "augmentation_mask"):
        assert torch.equal(getattr(runs[0], field), getattr(runs[1], field)), field
    assert not torch.equal(runs[0].sequences, runs[2].sequences)


def test_bfloat16_reasoner_generates():
    model = chatty_model("qwen2", "head", dtype=torch.bfloat16)
    input_ids, mask, _ = make_batch(model, [0, 0], "left", seed=8)
    out = model.generate(input_ids, mask, max_new_tokens=12, return_dict_in_generate=True)
    assert out.sequences.shape == (2, input_ids.shape[1] + 12) and (out.augmentation_mask == 1).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("trigger_mode", ["always", "lora", "head"])
def test_cuda_engine_equals_the_reference_on_cuda(trigger_mode):
    """The engine's CUDA path (native CUDA kernels, padded packed steps) against the reference on the same GPU."""
    model = chatty_model("qwen2", trigger_mode).to("cuda")
    input_ids, mask, _ = make_batch(model, [0] * 5, "left", seed=3)
    out = assert_same_as_reference(model, input_ids.cuda(), mask.cuda(), max_new_tokens=32)
    assert (out.augmentation_mask == 1).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sampling_takes_a_generator_made_for_device_cuda():
    """`torch.Generator(device="cuda")` carries no index; it names the model's device all the same."""
    model = chatty_model("qwen2", "lora").to("cuda")
    input_ids, mask, _ = make_batch(model, [0] * 3, "left", seed=3)
    runs = [model.generate(input_ids.cuda(), mask.cuda(), max_new_tokens=16, do_sample=True,
                           generator=torch.Generator(device="cuda").manual_seed(5)) for _ in range(2)]
    assert torch.equal(*runs)


# (batch, layout, decoding): every layout greedily at two batch sizes, and sampling with its filters and a penalty
SYNC_CASES = [(batch, layout, "greedy") for batch in (3, 16)
              for layout in ("default", "one batch row per item", "weaver in its own calls")]
SYNC_CASES.append((16, "default", "sampling"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("trigger_mode", ["always", "lora", "head"])
@pytest.mark.parametrize("batch,layout,decoding", SYNC_CASES)
def test_cuda_engine_synchronises_once_per_step(trigger_mode, batch, layout, decoding, monkeypatch):
    """CUDA's sync debug mode flags every synchronising call: twelve more steps cost at most twelve more, in each
    of the engine's layouts (a synchronisation hidden in one of them would show only there) and when sampling."""
    if layout == "one batch row per item":
        monkeypatch.setitem(generation.PACKED_PADDING_ITEMS, "cuda", 0)
    elif layout == "weaver in its own calls":
        monkeypatch.setitem(generation.JOINT_WEAVER_MODES, "cuda", ())
    model = chatty_model("qwen2", trigger_mode).to("cuda")
    input_ids, mask, _ = make_batch(model, [0] * batch, "left", seed=3)
    input_ids, mask = input_ids.cuda(), mask.cuda()
    never = model.tokenizer.convert_tokens_to_ids("<|im_start|>")  # no row finishes early
    sampling = {} if decoding == "greedy" else dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                                                    repetition_penalty=1.2)

    def syncs(new_tokens: int) -> int:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                generator = torch.Generator(device="cuda").manual_seed(0) if sampling else None
                model.generate(input_ids, mask, max_new_tokens=new_tokens, eos_token_id=never, generator=generator,
                               **sampling)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    syncs(4)  # warm-up: lazy initialisations
    assert syncs(24) - syncs(12) <= 12


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(do_sample=True, temperature=0.0), "temperature must be a finite number > 0"),
    (dict(eos_token_id=10**6), "eos_token_id must be token ids"),
    (dict(eos_token_id=[]), "eos_token_id must be token ids"),
    (dict(eos_token_id=torch.tensor([[0]])), "eos_token_id must be token ids"),
    (dict(eos_token_id=0.0), "eos_token_id must be token ids"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(do_sample=True, top_k=-1), r"top_k must be an int >= 0 \(0 or None: no top-k filtering"),
    (dict(max_new_tokens=10**4), "exceed the reasoner's context"),
    (dict(trigger_mode="lora"), "needs a model built with"),
    (dict(num_return_sequences=0), "num_return_sequences must be an int >= 1"),
    (dict(num_return_sequences=2), "needs do_sample=True"),
    (dict(do_sample=True, generator=0), "generator must be a torch.Generator, got int"),
])
def test_bad_generate_arguments(kwargs, match):
    model = chatty_model("qwen2", "always")
    input_ids, mask, _ = make_batch(model, [0, 0], "left", seed=1)
    with pytest.raises(ValueError, match=match):
        model.generate(input_ids, mask, **kwargs)


def test_sampling_settings_without_do_sample_warn_as_in_hugging_face_and_decode_greedily():
    """temperature / top_k / top_p with do_sample=False were dropped without a word; Hugging Face warns of them."""
    model = chatty_model("qwen2", "always")
    input_ids, mask, _ = make_batch(model, [0, 2], "left", seed=1)
    greedy = model.generate(input_ids, mask, max_new_tokens=6)
    with pytest.warns(UserWarning, match=r"do_sample=False decodes greedily, so \{'temperature': 0.7, 'top_k': 5\} "
                                         "are not used; pass do_sample=True") as caught:
        assert torch.equal(model.generate(input_ids, mask, max_new_tokens=6, temperature=0.7, top_k=5), greedy)
    assert caught[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # settings that change nothing warn of nothing
        model.generate(input_ids, mask, max_new_tokens=2, temperature=1.0, top_k=0, top_p=1.0)
        model.generate(input_ids, mask, max_new_tokens=2, do_sample=True, temperature=0.7, top_k=5,
                       generator=torch.Generator().manual_seed(0))


def test_a_tokenizer_without_eos_asks_for_eos_token_id():
    model = chatty_model("qwen2", "always")
    input_ids, mask, _ = make_batch(model, [0, 0], "left", seed=1)
    model.tokenizer.eos_token = None
    with pytest.raises(ValueError, match=r"got None \(the tokenizer names no EOS token: pass eos_token_id\)"):
        model.generate(input_ids, mask, max_new_tokens=4)
    assert model.generate(input_ids, mask, max_new_tokens=4, eos_token_id=0).shape == (2, input_ids.shape[1] + 4)


def test_token_ids_of_any_integer_type_generate_as_int64_ones():
    """Hugging Face takes int32 token ids (numpy or ONNX pipelines make them) and an EOS given as a tensor or a numpy
    integer, as its generation config holds it: each gives what the plain form gives."""
    model = chatty_model("qwen2", "always")
    input_ids, mask, _ = make_batch(model, [1, 0, 2], "left", seed=1)
    want = model.generate(input_ids, mask, max_new_tokens=12, eos_token_id=[5, 0], return_dict_in_generate=True)
    for ids, eos in ((input_ids.int(), [5, 0]), (input_ids, torch.tensor([5, 0])), (input_ids, (np.int64(5), 0))):
        out = model.generate(ids, mask, max_new_tokens=12, eos_token_id=eos, return_dict_in_generate=True)
        assert out.sequences.dtype == torch.long
        assert torch.equal(out.sequences, want.sequences) and torch.equal(out.augmentation_mask, want.augmentation_mask)
    one = model.generate(input_ids, mask, max_new_tokens=12, eos_token_id=torch.tensor(5))
    assert torch.equal(one, model.generate(input_ids, mask, max_new_tokens=12, eos_token_id=5))


def test_pad_token_id_fills_the_rows_after_their_eos():
    """Hugging Face code passes pad_token_id (often the EOS, to silence a warning): it chooses what follows a finished
    row's EOS, and nothing else."""
    model = chatty_model("qwen2", "always")
    input_ids, mask, _ = make_batch(model, [1, 0, 2, 0], "left", seed=1)
    width = input_ids.shape[1]
    free = model.generate(input_ids, mask, max_new_tokens=20)[:, width:]
    # an EOS that some row reaches a few tokens in and some other row never does: rows of both kinds
    eos = next(int(t) for t in free[:, 3:].flatten() if (~(free == t).any(1)).any())
    default = model.generate(input_ids, mask, max_new_tokens=20, eos_token_id=eos, return_dict_in_generate=True)
    custom = model.generate(input_ids, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=eos,
                            return_dict_in_generate=True)
    after_eos = (default.sequences[:, width:] == eos).long().cumsum(1) - (default.sequences[:, width:] == eos).long()
    after_eos = after_eos > 0
    assert after_eos.any()
    assert (default.sequences[:, width:][after_eos] == model.tokenizer.pad_token_id).all()
    assert (custom.sequences[:, width:][after_eos] == eos).all()
    assert torch.equal(custom.sequences[:, width:][~after_eos], default.sequences[:, width:][~after_eos])
    assert torch.equal(custom.augmentation_mask, default.augmentation_mask)
    for bad in (-1, 10**6, 1.0, True):
        with pytest.raises(ValueError, match="pad_token_id must be a token id"):
            model.generate(input_ids, mask, max_new_tokens=2, pad_token_id=bad)


@pytest.mark.parametrize("trigger_mode", ["always", "lora", "head"])
def test_torch_default_dtype_changes_nothing(trigger_mode):
    """Programs that set torch's default dtype to bfloat16: the engine made its latent norms and its sampling uniforms
    in it (generation raised in index_put; sampling would have drawn from rounded uniforms), and memgen's own trained
    modules were made in it."""
    model = chatty_model("qwen2", trigger_mode)
    input_ids, mask, labels = make_batch(model, [1, 0, 2, 0], "left", seed=1)

    def run():
        greedy = model.generate(input_ids, mask, max_new_tokens=16, return_dict_in_generate=True)
        sampled = model.generate(input_ids, mask, max_new_tokens=16, do_sample=True, return_dict_in_generate=True,
                                 generator=torch.Generator().manual_seed(0))
        return greedy, sampled, model(input_ids, mask, labels).loss

    want = run()
    torch.set_default_dtype(torch.bfloat16)
    try:
        got = run()
        built = make_model(trigger_mode=trigger_mode)
    finally:
        torch.set_default_dtype(torch.float32)
    for out, ref in zip(got[:2], want[:2]):
        assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.augmentation_mask, ref.augmentation_mask)
        assert torch.equal(out.latent_norms.nan_to_num(), ref.latent_norms.nan_to_num())
    assert torch.equal(got[2], want[2])
    trained = [*built.stage_parameters("weaver").values(), *built.stage_parameters("trigger").values()]
    assert {p.dtype for p in trained} == {torch.float32}


def test_bad_generate_inputs():
    model = chatty_model("qwen2", "always")
    input_ids, mask, _ = make_batch(model, [0, 0], "left", seed=1)
    with pytest.raises(ValueError, match="empty batch"):
        model.generate(input_ids[:0], mask[:0])
    with pytest.raises(ValueError, match="is on meta"):
        model.generate(input_ids.to("meta"), mask.to("meta"))
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor \[B, L\], got torch.float32 of shape"):
        model.generate(input_ids.float(), mask)
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor \[B, L\], got list"):
        model.generate(input_ids.tolist(), mask)
    holes = mask.clone()
    holes[0, -2] = 0
    with pytest.raises(ValueError, match="contiguous"):
        model.generate(input_ids, holes)


def test_sequences_longer_than_the_context_are_refused():
    tok = chat_tokenizer()
    torch.manual_seed(0)
    reasoner = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64)).eval()
    model = MemGenModel.from_reasoner(reasoner, tok, MemGenConfig(prompt_latents_len=2, inference_latents_len=2))
    input_ids, mask, _ = make_batch(model, [0, 0], "left", seed=1)
    room = 64 - int(mask.sum(1).max()) - 2 - 2 * model.config.max_inference_aug_num
    with pytest.raises(ValueError, match="the reasoner's context of 64 positions"):
        model.generate(input_ids, mask, max_new_tokens=room + 1)
    assert_same_as_reference(model, input_ids, mask, max_new_tokens=room)
    # the room counts the latents this call can weave: its budgets, none with memory off
    for kwargs, latents in ((dict(max_inference_aug_num=1), 2 + 2), (dict(max_prompt_aug_num=0), 2 * 5),
                            (dict(memory=False), 0)):
        room = 64 - int(mask.sum(1).max()) - latents
        with pytest.raises(ValueError, match=rf"latents \({latents}\) exceed"):
            model.generate(input_ids, mask, max_new_tokens=room + 1, **kwargs)
        model.generate(input_ids, mask, max_new_tokens=room, **kwargs)


@pytest.mark.parametrize("trigger_mode", ["always", "lora", "head"])
def test_repetition_penalty_equals_reference(trigger_mode):
    model = chatty_model("qwen2", trigger_mode)
    input_ids, mask, _ = make_batch(model, [0, 0, 0], "right", seed=12)
    plain = model.generate(input_ids, mask, max_new_tokens=24)
    out = assert_same_as_reference(model, input_ids, mask, max_new_tokens=24, repetition_penalty=1.8)
    assert not torch.equal(out.sequences, plain), "the penalty should change what is generated"


def test_repetition_penalty_with_memory_off_equals_hugging_face():
    model = chatty_model("llama")
    input_ids, mask, _ = make_batch(model, [0, 0], "left", seed=13)
    ours = model.generate(input_ids, mask, max_new_tokens=16, memory=False, repetition_penalty=1.5)
    tok = model.tokenizer
    theirs = model.reasoner.generate(input_ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                     repetition_penalty=1.5, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
    assert torch.equal(ours, theirs[:, : ours.shape[1]])


class Collector:
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_receives_the_prompt_then_each_token():
    model = chatty_model("qwen2", "always")
    input_ids, mask, _ = make_batch(model, [0], "left", seed=14)
    streamer = Collector()
    sequences = model.generate(input_ids, mask, max_new_tokens=10, streamer=streamer)
    assert streamer.ended and torch.equal(streamer.chunks[0], input_ids)
    streamed = torch.stack(streamer.chunks[1:], 1)
    assert torch.equal(streamed, sequences[:, input_ids.shape[1]:])
    with pytest.raises(ValueError, match="streamer must have put"):
        model.generate(input_ids, mask, max_new_tokens=2, streamer=object())
    with pytest.raises(ValueError, match="repetition_penalty must be"):
        model.generate(input_ids, mask, max_new_tokens=2, repetition_penalty=0)


@pytest.mark.parametrize("trigger_mode,memory", [("always", True), ("head", True), ("always", False)])
def test_stop_strings_end_rows_where_their_text_does(trigger_mode, memory):
    model = chatty_model("qwen2", trigger_mode)
    input_ids, mask, _ = make_batch(model, [0] * 4, "left", seed=21)
    prompt = input_ids.shape[1]
    free = model.generate(input_ids, mask, max_new_tokens=40, return_dict_in_generate=True, memory=memory)
    eos = model.tokenizer.eos_token_id
    assert torch.equal(free.completion_mask, completion_mask(free.sequences[:, prompt:], [eos]))
    texts = [model.tokenizer.decode(row) for row in free.sequences[:, prompt:]]
    stop = texts[0][len(texts[0]) // 2: len(texts[0]) // 2 + 2]  # two characters from the middle of row 0
    assert stop.strip(), texts[0]
    out = model.generate(input_ids, mask, max_new_tokens=40, return_dict_in_generate=True, stop_strings=[stop],
                         memory=memory)
    pad = model.tokenizer.pad_token_id
    assert pad != eos
    stopped = 0
    for row in range(4):
        new = free.sequences[row, prompt:].tolist()
        cut = next((t + 1 for t in range(len(new)) if stop in model.tokenizer.decode(new[: t + 1])), len(new))
        got = out.sequences[row, prompt:].tolist()
        assert got[:cut] == new[:cut], row
        assert all(t == pad for t in got[cut:]), row
        assert torch.equal(out.augmentation_mask[row, :cut], free.augmentation_mask[row, :cut])
        assert (out.augmentation_mask[row, cut:] == -100).all()
        # the completion runs through the stop string's last token (or the row's EOS, where that came first)
        real = [t < cut and kept for t, kept in enumerate(free.completion_mask[row].tolist())]
        assert out.completion_mask[row].tolist() == real[:out.completion_mask.shape[1]], row
        stopped += cut < len(new)
    assert stopped >= 1


@pytest.mark.parametrize("trigger_mode", ["always", "head", "lora"])
def test_output_latents_are_the_weaves_of_each_row_s_stream(trigger_mode):
    """Each row's latents, in order, equal the reference's weave of the row's stream where its mask says INVOKE
    (the prompt's at column 0); rows run ahead of each other here, so weaves of one call serve several columns."""
    from memgen.reference import _weave
    from memgen.weaver import INFERENCE, PROMPT

    model = chatty_model("qwen2", trigger_mode)
    input_ids, mask, _ = make_batch(model, [0, 3, 1, 5], "left", seed=8)
    out = model.generate(input_ids, mask, max_new_tokens=30, return_dict_in_generate=True, output_latents=True)
    embed = model.reasoner.get_input_embeddings()
    new = out.sequences[:, input_ids.shape[1]:]
    woven = 0
    with torch.no_grad():
        for row in range(input_ids.shape[0]):
            stream, expected = list(embed(input_ids[row][mask[row].bool()])), []
            for column in out.completion_mask[row].nonzero().flatten().tolist():
                if out.augmentation_mask[row, column] == 1:
                    expected.append(torch.stack(_weave(model, stream, PROMPT if column == 0 else INFERENCE)))
                    stream.extend(expected[-1])
                stream.append(embed(new[row, column]))
            assert len(out.latents[row]) == len(expected) == int((out.augmentation_mask[row] == 1).sum()), row
            for got, want in zip(out.latents[row], expected):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            norms = out.latent_norms[row][out.augmentation_mask[row] == 1]
            torch.testing.assert_close(torch.stack([x.float().norm(dim=-1).mean() for x in out.latents[row]]), norms)
            woven += len(expected)
    assert woven > input_ids.shape[0]  # inference weaves beside the prompt's
    in_step = model.generate(input_ids, mask, max_new_tokens=30, return_dict_in_generate=True, output_latents=True,
                             streamer=Collector())  # rows kept in step: each weave at one column for every row
    for ahead, kept in zip(out.latents, in_step.latents):
        assert len(ahead) == len(kept)
        for a, b in zip(ahead, kept):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert model.generate(input_ids, mask, max_new_tokens=4, return_dict_in_generate=True).latents is None
    with pytest.raises(ValueError, match="output_latents must be a bool, and True needs return_dict_in_generate"):
        model.generate(input_ids, mask, max_new_tokens=4, output_latents=True)


def test_nearest_tokens_of_latents():
    model = chatty_model("qwen2", "always")
    embeddings = model.reasoner.get_input_embeddings().weight
    picked = torch.tensor([[5, 17], [40, 3]])
    similarity, ids = nearest_tokens(model, 3.0 * embeddings[picked], k=4)  # a scaled token: its own nearest
    assert ids.shape == similarity.shape == (2, 2, 4) and torch.equal(ids[..., 0], picked)
    torch.testing.assert_close(similarity[..., 0], torch.ones(2, 2))
    assert (similarity[..., :-1] >= similarity[..., 1:]).all()
    cosine = torch.nn.functional.cosine_similarity(embeddings[picked][..., None, :], embeddings[ids], dim=-1)
    torch.testing.assert_close(similarity, cosine)
    with pytest.raises(ValueError, match="latents must be a tensor"):
        nearest_tokens(model, torch.zeros(3, 5), k=2)
    with pytest.raises(ValueError, match="k must be an int in"):
        nearest_tokens(model, embeddings[:2], k=0)


def test_bad_stop_strings():
    model = chatty_model("qwen2", "always")
    input_ids, mask, _ = make_batch(model, [0], "left", seed=1)
    for bad in ("", [], [""], [3]):
        with pytest.raises(ValueError, match="stop_strings"):
            model.generate(input_ids, mask, max_new_tokens=4, stop_strings=bad)


def test_synced_ranks_needs_a_process_group():
    model = chatty_model("qwen2", "always")
    input_ids, mask, _ = make_batch(model, [0], "left")
    with pytest.raises(ValueError, match="synced_ranks=True needs an initialised torch.distributed"):
        model.generate(input_ids, mask, max_new_tokens=4, synced_ranks=True)


def test_a_zero3_partitioned_model_is_decoded_only_through_its_engine():
    """A parameter carrying ZeRO-3's mark (`ds_id`) makes the model partitioned, DeepSpeed installed or not."""
    model = chatty_model("qwen2", "always")
    input_ids, mask, _ = make_batch(model, [0], "left", seed=1)
    next(model.parameters()).ds_id = 0
    with pytest.raises(ValueError, match="gathered_for_decoding"):
        model.generate(input_ids, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="through its DeepSpeed engine"), gathered_for_decoding(model):
        pass


@pytest.mark.parametrize("arch,batch", [("qwen2", 1), ("qwen3", 1), ("llama", 1), ("qwen2", 3)])
def test_steps_whose_rows_are_equally_long_attend_without_a_mask(arch, batch):
    """A one-item step in which every row sees exactly its own slots needs no mask; without one, attention takes
    plain decoding's path. Ragged rows keep theirs. Either way the tokens are Hugging Face's."""
    model = chatty_model(arch)
    input_ids, mask, _ = make_batch(model, [0] * batch, "left", seed=6)
    masks = []
    hook = model.reasoner.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True)
    ours = model.generate(input_ids, mask, max_new_tokens=12, memory=False)
    hook.remove()
    ragged = bool((mask == 0).any())
    assert ragged == (batch > 1), "the batch of 3 should have prompts of different lengths"
    assert masks[0] is not None and len(masks) == ours.shape[1] - input_ids.shape[1]  # prompts, then a call per token
    assert all((m is not None) == ragged for m in masks[1:])
    tok = model.tokenizer
    theirs = model.reasoner.generate(input_ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert torch.equal(ours, theirs[:, : ours.shape[1]])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("trigger_mode", ["always", "head"])
def test_calls_of_several_items_per_row_attend_to_each_rows_cache_in_place(attention, trigger_mode, monkeypatch):
    """Over SDPA attention a call of one item per batch row attends per cache row (`memgen.attention`); under any
    other attention each item's batch row gets a copy of its row's cache. Both weave what the reference weaves."""
    monkeypatch.setitem(generation.JOINT_WEAVER_MODES, "cpu", ("always", "head", "lora"))
    model = chatty_model("qwen2", trigger_mode)
    monkeypatch.setattr(model.reasoner.get_decoder().config, "_attn_implementation", attention)
    grouped = []
    monkeypatch.setattr(generation, "RaggedGroups", lambda *args: grouped.append(RaggedGroups(*args)) or grouped[-1])
    input_ids, mask, _ = make_batch(model, [0] * 5, "left", seed=3)
    out = assert_same_as_reference(model, input_ids, mask, max_new_tokens=32)
    assert (out.augmentation_mask[:, 1:] == 1).sum() >= 3
    if attention == "sdpa":
        assert any(len(g.groups) == 2 for g in grouped), "calls should mix rows of one item and of several"
    else:
        assert not grouped


def loaded_with_attention(model, attention, trigger_mode, monkeypatch) -> list:
    """Set the attention implementation of every base a generate call in `trigger_mode` runs to `attention`, an
    implementation that must not be called (it raises); returns the bases' decoder configs."""
    def misreads_the_mask(*args, **kwargs):
        raise AssertionError(f"{attention} was called")

    monkeypatch.setitem(AttentionInterface._global_mapping, attention, misreads_the_mask)
    configs = {id(base.get_decoder().config): base.get_decoder().config
               for base in model._decoding_bases(trigger_mode).values()}
    for config in configs.values():
        monkeypatch.setattr(config, "_attn_implementation", attention)
    return list(configs.values())


@pytest.mark.parametrize("attention", ["flash_attention_2", "flex_attention"])
@pytest.mark.parametrize("trigger_mode", ["always", "lora"])
@pytest.mark.parametrize("separate_bases", [False, True])
def test_models_loaded_with_an_attention_that_takes_no_4d_mask_decode_through_sdpa(attention, trigger_mode,
                                                                                    separate_bases, monkeypatch):
    """Flash attention reads a mask as [B, L] padding and FlexAttention indexes it by its own shapes: neither
    applies the engine's masks over per-row cache slots (on a CPU FlexAttention corrupted memory). A model loaded
    with either generates what the reference generates, every base's calls running under SDPA, and keeps its own
    attention outside the engine."""
    vocab = len(chat_tokenizer())
    bases = dict(weaver_base=tiny_causal_lm("llama", vocab, seed=7),
                 trigger_base=tiny_causal_lm("qwen3", vocab, seed=8))
    model = chatty_model("qwen2", trigger_mode, **(bases if separate_bases else {}))
    input_ids, mask, _ = make_batch(model, [0] * 5, "left", seed=3)
    want_seq, want_mask = reference_generate(model, input_ids, mask, max_new_tokens=24)

    configs = loaded_with_attention(model, attention, trigger_mode, monkeypatch)
    assert len(configs) == ((2 + (trigger_mode == "lora")) if separate_bases else 1)
    out = model.generate(input_ids, mask, max_new_tokens=24, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want_seq) and torch.equal(out.augmentation_mask, want_mask)
    assert (out.augmentation_mask == 1).sum() >= 3
    assert all(config._attn_implementation == attention for config in configs)


@pytest.mark.parametrize("memory", [True, False])
def test_generating_in_train_mode_with_activation_checkpointing_on(memory):
    """A model left in train mode after a checkpointed training run generates what it does in eval mode (its adapters
    have no dropout here): before transformers 5.24 a checkpointed layer in train mode drops the cache it is passed,
    so the engine pauses checkpointing for the call, and gives each layer its setting back after."""
    model = chatty_model("qwen2", "always")
    input_ids, mask, _ = make_batch(model, [0, 2, 1], "left", seed=3)
    want = model.generate(input_ids, mask, max_new_tokens=20, return_dict_in_generate=True, memory=memory)
    model.activation_checkpointing_enable()
    model.train()
    got = model.generate(input_ids, mask, max_new_tokens=20, return_dict_in_generate=True, memory=memory)
    assert torch.equal(got.sequences, want.sequences) and torch.equal(got.augmentation_mask, want.augmentation_mask)
    layers = model.reasoner.get_decoder().layers
    assert all(layer.gradient_checkpointing and layer.training for layer in layers)


@pytest.mark.parametrize("trigger_mode", ["always", "lora", "head"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_generation_under_autocast_agrees_with_the_reference_under_it(arch, trigger_mode):
    """A trainer's mixed precision (`torch.autocast`) may be on when it samples: the engine's attention then returns
    the lowered dtype, as Hugging Face's does (its calls of one item per batch row used to fail to write it)."""
    model = chatty_model(arch, trigger_mode)
    input_ids, mask, _ = make_batch(model, [0, 2, 1, 5], "left", seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(input_ids, mask, max_new_tokens=30, return_dict_in_generate=True)
        want = reference_generate(model, input_ids, mask, max_new_tokens=30)
    _agree_up_to_rounding(out, want, input_ids.shape[1])


def _agree_up_to_rounding(out, want, prompt_width):
    """16-bit arithmetic rounds differently in the engine's calls and the reference's: a near-tie may flip a token
    and the rows go apart from there, so exact equality would depend on the CPU's kernels. Wrong latents or a wrong
    mask send every row apart at its first insertion instead: nine tokens and decisions in ten must agree."""
    new, want_new = out.sequences[:, prompt_width:], want[0][:, prompt_width:]
    assert (new == want_new).float().mean() >= 0.9 and (out.augmentation_mask == want[1]).float().mean() >= 0.9
    assert (out.augmentation_mask[:, 1:] == 1).any()


@pytest.mark.parametrize("weaver_targets,trigger_targets", [(["q_proj"], ["k_proj", "o_proj"]),
                                                           (["q_proj", "v_proj"], ["v_proj", "up_proj"])])
def test_weaver_and_trigger_adapters_on_different_layers(weaver_targets, trigger_targets):
    """Each adapter on layers of its own, or partly shared (building such a model used to fail with a KeyError)."""
    tok = chat_tokenizer()
    config = MemGenConfig(prompt_latents_len=3, inference_latents_len=2, trigger_mode="lora",
                          weaver_lora={"target_modules": weaver_targets, "lora_dropout": 0.0},
                          trigger_lora={"target_modules": trigger_targets, "lora_dropout": 0.0})
    model = MemGenModel.from_reasoner(tiny_causal_lm("qwen2", len(tok)), tok, config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # delimiters likely, a trigger that both invokes and skips, adapters that matter
        model.reasoner.get_output_embeddings().weight[model.delimiter_table.nonzero().flatten()] *= 2.5
        model.trigger.output_layer.weight.normal_(0, 1.0, generator=g)
        for name, p in [*model.stage_parameters("weaver").items(), *model.stage_parameters("trigger").items()]:
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    input_ids, mask, _ = make_batch(model, [0, 2, 1, 4], "left", seed=3)
    out = model.generate(input_ids, mask, max_new_tokens=30, return_dict_in_generate=True)
    want_seq, want_mask = reference_generate(model, input_ids, mask, max_new_tokens=30)
    assert torch.equal(out.sequences, want_seq) and torch.equal(out.augmentation_mask, want_mask)
    assert (out.augmentation_mask[:, 1:] == 1).any() and (out.augmentation_mask[:, 1:] == 0).any()


def test_top_k_zero_filters_nothing_as_in_hugging_face():
    model = chatty_model("qwen2", "always")
    input_ids, mask, _ = make_batch(model, [0, 2], "left", seed=1)
    runs = [model.generate(input_ids, mask, max_new_tokens=12, do_sample=True, top_k=top_k,
                           generator=torch.Generator().manual_seed(7)) for top_k in (0, None, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_threads_generating_with_one_model_each_get_their_own_result():
    """Decoding swaps layers and attention settings on the model for its call: threads sharing a model (a server's)
    take turns, and each gets what it would alone (they used to run each other's settings: other tokens, errors)."""
    import threading

    model = chatty_model("qwen2", "lora")
    input_ids, mask, _ = make_batch(model, [0, 2, 1, 5], "left", seed=3)
    jobs = [dict(trigger_mode="lora"), dict(memory=False), dict(trigger_mode="always"), dict(max_new_tokens=45)]
    want = [model.generate(input_ids, mask, **{"max_new_tokens": 30, **job}) for job in jobs]
    got = [None] * len(jobs)

    def run(i):
        try:
            got[i] = model.generate(input_ids, mask, **{"max_new_tokens": 30, **jobs[i]})
        except Exception as err:  # noqa: BLE001 (reported below)
            got[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(g, torch.Tensor) and torch.equal(g, w) for g, w in zip(got, want)), got


@pytest.mark.parametrize("reasoner_dtype,weaver_dtype,trigger_mode", [
    (torch.bfloat16, torch.float32, "always"), (torch.float32, torch.bfloat16, "always"),
    (torch.bfloat16, torch.float16, "head")])
def test_a_separate_weaver_base_in_another_dtype(reasoner_dtype, weaver_dtype, trigger_mode):
    """The weaver's own calls take their mask in its dtype (it was made in the stream's, the reasoner's, which SDPA
    refused beside the weaver's queries). Against the reference up to 16-bit rounding."""
    tok = chat_tokenizer()
    config = MemGenConfig(trigger_mode=trigger_mode, weaver_lora={"lora_dropout": 0.0}, prompt_latents_len=3,
                          inference_latents_len=2)
    model = MemGenModel.from_reasoner(tiny_causal_lm("qwen2", len(tok)).to(reasoner_dtype), tok, config,
                                      weaver_base=tiny_causal_lm("llama", len(tok), hidden_size=48, seed=2)
                                      .to(weaver_dtype)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.reasoner.get_output_embeddings().weight[model.delimiter_table.nonzero().flatten()] *= 2.5
        for name, p in model.stage_parameters("weaver").items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if trigger_mode == "head":
            model.trigger.output_layer.weight.normal_(0, 1.0, generator=g)
    input_ids, mask, _ = make_batch(model, [0, 2, 1, 4], "left", seed=3)
    out = model.generate(input_ids, mask, max_new_tokens=30, return_dict_in_generate=True)
    _agree_up_to_rounding(out, reference_generate(model, input_ids, mask, max_new_tokens=30), input_ids.shape[1])
