"""Random cases against the reference, fresh each run: greedy generation (on Qwen2, Qwen3 and Llama, and on
the other decoder classes, sliding windows included) and the training forward, over drawn architectures,
latent counts, budgets, batch sizes, padding sides, lengths, weaver bases and engine layouts. Each case's
seed is in its test id and its failure message; `MEMGEN_RANDOM_SEED=S` replays a run and
`MEMGEN_RANDOM_CASES=N` draws N cases of each kind (default 8). Where a CUDA GPU is present each case also
runs there, the model and the reference both on the GPU."""

from __future__ import annotations

import os
import random

import pytest
import torch
import transformers

from memgen import generation
from memgen.reference import reference_generate, reference_penalize
from offline import chat_tokenizer, tiny_causal_lm
from test_architectures import ARCHITECTURES, TINY_FIELDS, skip_unless_buildable, weaving_model
from test_modeling import assert_matches_reference, make_batch, make_model
from test_reference_generation import chatty_model

RUN_SEED = int(os.environ.get("MEMGEN_RANDOM_SEED", random.SystemRandom().randrange(10**6)))
CASES = int(os.environ.get("MEMGEN_RANDOM_CASES", "8"))
SEEDS = [RUN_SEED * 1000 + i for i in range(CASES)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The engine's layouts and schedules (see test_generation's `packing`): the device's defaults, the weaver in the
# reasoner's calls one batch row per item or per row, the weaver in calls of its own.
LAYOUTS = {"default": {}, "joint": {"modes": ("always", "head", "lora")},
           "joint, packed": {"modes": ("always", "head", "lora"), "packed": 10**9}, "own calls": {"modes": ()}}


def _differs_only_after_a_tie(model, input_ids, mask, got, want_seq, want_mask, penalty: float) -> bool:
    """Whether each row that differs from the reference first differs at a token that float32 rounding may
    decide either way: the decisions agree up to it, and the reference's two tokens there score within
    1e-4 (relative) of each other. The scores come from teacher-forcing the shared prefix, at its recorded
    insertion points, through the training forward (which reproduces generation). Random tiny models
    sometimes alternate between two near-tied tokens: a 1e-6 relative change of the LM head then flips the
    reference itself."""
    length = input_ids.shape[1]
    for b in range(input_ids.shape[0]):
        tokens_differ = (got.sequences[b, length:] != want_seq[b, length:]).nonzero().flatten()
        decisions_differ = (got.augmentation_mask[b] != want_mask[b]).nonzero().flatten()
        if not tokens_differ.numel() and not decisions_differ.numel():
            continue
        if not tokens_differ.numel():
            return False
        c = int(tokens_differ[0])
        if decisions_differ.numel() and int(decisions_differ[0]) <= c:
            return False
        prompt = input_ids[b][mask[b].bool()]
        new = want_seq[b, length:length + c + 1]
        ids = torch.cat([prompt, new])[None]
        labels = torch.cat([torch.full_like(prompt, -100), new])[None]
        points = torch.cat([torch.zeros_like(prompt), want_mask[b, :c + 1]])[None]
        with torch.no_grad():
            logits = model(ids, torch.ones_like(ids), labels, augmentation_points=points).logits[0, -2].float()
        logits = reference_penalize(logits, ids[0, :-1].tolist(), penalty)
        ours, theirs = int(got.sequences[b, length + c]), int(want_seq[b, length + c])
        if abs(float(logits[ours] - logits[theirs])) > 1e-4 * max(1.0, float(logits.abs().max())):
            return False
    return True


def _assert_same_as_reference_but_ties(model, input_ids, mask, described: str, **kwargs) -> None:
    """Greedy generation equals the reference, token for token and decision for decision, up to each row's
    first near tie (see `_differs_only_after_a_tie`)."""
    want_seq, want_mask = reference_generate(model, input_ids, mask, **kwargs)
    got = model.generate(input_ids, mask, return_dict_in_generate=True, **kwargs)
    if torch.equal(got.sequences, want_seq) and torch.equal(got.augmentation_mask, want_mask):
        return
    assert got.sequences.shape == want_seq.shape, described
    penalty = kwargs.get("repetition_penalty", 1.0)
    assert _differs_only_after_a_tie(model, input_ids, mask, got, want_seq, want_mask, penalty), (
        f"{described}\nnew tokens {got.sequences[:, input_ids.shape[1]:]}\nreference {want_seq[:, input_ids.shape[1]:]}"
        f"\ndecisions {got.augmentation_mask}\nreference {want_mask}")


def _use_layout(monkeypatch, layout: str, device: str) -> None:
    settings = LAYOUTS[layout]
    if "modes" in settings:
        monkeypatch.setitem(generation.JOINT_WEAVER_MODES, device, settings["modes"])
    if "packed" in settings:
        monkeypatch.setitem(generation.PACKED_PADDING_ITEMS, device, settings["packed"])


def _weaver_base(rng: random.Random):
    """None (the reasoner's base) or a separate base with another hidden size."""
    if rng.random() < 0.75:
        return None
    return tiny_causal_lm(rng.choice(["qwen2", "llama"]), 420, hidden_size=rng.choice([32, 96]), seed=7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_greedy_generation_equals_the_reference(seed, device, monkeypatch):
    rng = random.Random(seed)
    case = dict(arch=rng.choice(["qwen2", "qwen3", "llama"]), trigger_mode=rng.choice(["always", "lora", "head"]),
                k_prompt=rng.choice([1, 2, 4, 8]), k_inference=rng.choice([1, 2, 4, 8]), max_prompt=rng.choice([0, 1]),
                max_inference=rng.randint(0, 5), boost=rng.choice([1.5, 2.0, 2.5, 3.0]))
    batch, padding = rng.choice([1, 2, 3, 5, 7, 16]), rng.choice(["left", "right"])
    layout = rng.choice(sorted(LAYOUTS))
    kwargs = dict(max_new_tokens=rng.choice([1, 2, 5, 17, 40, 80, 200]), repetition_penalty=rng.choice([1.0, 1.3]))
    if rng.random() < 0.3:
        kwargs.update(max_prompt_aug_num=rng.choice([0, 1]), max_inference_aug_num=rng.randint(0, 5))
    _use_layout(monkeypatch, layout, device)
    model = chatty_model(seed=rng.randint(0, 50), weaver_base=_weaver_base(rng), **case).to(device)
    if rng.random() < 0.3:  # a delimiter also ends rows: rows finish at different steps
        delimiters = model.delimiter_table.nonzero().flatten().tolist()
        kwargs["eos_token_id"] = [model.tokenizer.eos_token_id, rng.choice(delimiters)]
    input_ids, mask, _ = make_batch(model, [0] * batch, padding, seed=rng.randint(0, 10**6))
    input_ids, mask = input_ids.to(device), mask.to(device)
    described = f"seed {seed} on {device}: {case}, batch {batch}, {padding} padding, layout {layout}, {kwargs}"
    _assert_same_as_reference_but_ties(model, input_ids, mask, described, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_greedy_generation_on_other_decoders_equals_the_reference(seed, device, monkeypatch):
    """The decoder classes of tests/test_architectures.py; where the class has one, a sliding window as short as 3
    tokens (the engine applies it per row)."""
    rng = random.Random(seed)
    arch, trigger_mode = rng.choice(sorted(ARCHITECTURES)), rng.choice(["always", "lora", "head"])
    prefix, extra, targets = ARCHITECTURES[arch]
    fields = {**TINY_FIELDS, **extra}
    if "sliding_window" in fields and fields["sliding_window"] is not None and rng.random() < 0.6:
        fields["sliding_window"] = rng.choice([3, 5, 8, 16])
    batch, padding = rng.choice([1, 2, 3, 5, 8]), rng.choice(["left", "right"])
    new_tokens = rng.choice([1, 3, 17, 40, 90])
    layout = rng.choice(sorted(LAYOUTS))
    _use_layout(monkeypatch, layout, device)
    tok = chat_tokenizer()
    config = skip_unless_buildable(getattr(transformers, f"{prefix}Config"))(**fields, vocab_size=len(tok))
    torch.manual_seed(rng.randint(0, 100))  # the reasoner's random weights
    model = weaving_model(getattr(transformers, f"{prefix}ForCausalLM")(config), tok, targets, trigger_mode).to(device)
    input_ids, mask, _ = make_batch(model, [0] * batch, padding, seed=rng.randint(0, 10**6))
    input_ids, mask = input_ids.to(device), mask.to(device)
    described = (f"seed {seed} on {device}: {arch}, {trigger_mode}, window {fields.get('sliding_window')}, "
                 f"batch {batch}, {padding} padding, {new_tokens} new tokens, layout {layout}")
    _assert_same_as_reference_but_ties(model, input_ids, mask, described, max_new_tokens=new_tokens)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_training_forward_equals_the_reference(seed, device):
    """Loss, logits and the weaver's gradients. The latent scales' gradients are sums of many cancelling terms:
    in float32 both implementations stray from a float64 computation by up to ~5e-4 relative (seen on gradients
    of ~1e-6), so theirs are compared more loosely."""
    rng = random.Random(seed)
    case = dict(k_prompt=rng.choice([1, 2, 4, 8]), k_inference=rng.choice([1, 2, 4, 8]), max_prompt=rng.choice([0, 1]),
                max_inference=rng.randint(0, 6))
    arch, batch = rng.choice(["qwen2", "qwen3", "llama"]), rng.choice([1, 2, 3, 5, 8])
    padding = rng.choice(["left", "right"])
    weaver_base = _weaver_base(rng)
    model = make_model(arch, seed=rng.randint(0, 50), weaver_base=weaver_base, **case).train().to(device)
    input_ids, mask, labels = make_batch(model, [rng.randint(0, 9) for _ in range(batch)], padding,
                                         seed=rng.randint(0, 10**6))
    input_ids, mask, labels = input_ids.to(device), mask.to(device), labels.to(device)
    described = (f"seed {seed} on {device}: {arch}, {case}, batch {batch}, {padding} padding, "
                 f"own weaver base {weaver_base is not None}")
    try:
        assert_matches_reference(model, input_ids, mask, labels, latent_scale_tolerance=1e-2)
    except AssertionError as err:
        raise AssertionError(f"{described}\n{err}") from None
