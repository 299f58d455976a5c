"""Trigger RL: the reward-adaptive penalty, decisions replayed from the trigger's logits, the refusal of an
untrained weaver, and the invocation rate falling when invoking costs and does not help."""

from __future__ import annotations

import pytest
import torch

from memgen import MemGenModel
from memgen.adapters import tuner_layers
from memgen.training import sft_trainer
from memgen.training.trigger_rl import TriggerConfig, TriggerTrainer, adaptive_penalty
from offline import save_base
from test_grpo import _config as grpo_config
from test_grpo import _prompts
from test_modeling import make_model
from test_reference_generation import chatty_model
from test_sft import _args, _rows


def test_adaptive_penalty_by_hand():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0])
    decisions = torch.tensor([[1, 0, 1, 0], [0, 0, -100, -100], [1, 1, 1, -100], [1, 0, 0, 0]])
    # median 0.5: H_high = rows 0 and 1, rates 0.5 and 0 -> p_bar 0.25; penalty n * 0.75
    shaped = adaptive_penalty(rewards, decisions, group_size=4, penalty=1.0)
    assert shaped.tolist() == pytest.approx([1 - 1.5, 1.0, -2.25, -0.75])
    assert adaptive_penalty(rewards, decisions, 4, 0.0).tolist() == rewards.tolist()
    # every rollout invoking at every point: p_bar = 1, nothing is penalised
    assert adaptive_penalty(rewards, torch.ones(4, 3, dtype=torch.long), 4, 5.0).tolist() == rewards.tolist()


def _config(tmp_path, **kw):
    return grpo_config(tmp_path, TriggerConfig, **{"max_new_tokens": 8, "learning_rate": 1e-1, **kw})


@pytest.mark.parametrize("mode", ["lora", "head"])
def test_decisions_are_replayed_from_the_trigger_logits(tmp_path, mode):
    model = chatty_model("qwen2", mode, k_prompt=4, k_inference=2)  # reaches delimiters; both invokes and skips
    trainer = TriggerTrainer(model, _config(tmp_path, temperature=1e-4, max_new_tokens=16), _prompts(4),
                             reward=lambda text, target: 0.0, allow_untrained_weaver=True)
    batch = trainer.rollouts(_prompts(4))
    logits = model(batch.input_ids, batch.attention_mask, batch.labels, augmentation_points=batch.points,
                   trigger_logits=True).trigger_logits
    assert logits.shape == (*batch.input_ids.shape, 2) and logits.dtype == torch.float32
    taken = torch.full_like(batch.decided, -100)
    taken[:, :-1] = batch.decided[:, 1:]
    mask = taken >= 0
    assert mask.sum(1).min() >= 1 and (taken[mask] == 1).any() and (taken[mask] == 0).any()
    assert torch.equal(logits.argmax(-1)[mask], taken[mask])  # near-greedy decisions, read back


def test_head_logits_in_training_mode_read_the_stream_generation_wove(tmp_path):
    """A frozen weaver with LoRA dropout: in training mode (as Trainer runs the loss) the `head` trigger's logits
    are those of the stream as generation wove it, not of a stream woven with dropout."""
    model = chatty_model("qwen2", "head", k_prompt=4, k_inference=2)
    for layer in tuner_layers(model.weaver.model):
        if "weaver" in layer.lora_dropout:
            layer.lora_dropout["weaver"] = torch.nn.Dropout(0.5)
    trainer = TriggerTrainer(model, _config(tmp_path, max_new_tokens=16), _prompts(4),
                             reward=lambda text, target: 0.0, allow_untrained_weaver=True)
    batch = trainer.rollouts(_prompts(4))
    assert (batch.points == 1).any()

    def logits():
        return model(batch.input_ids, batch.attention_mask, batch.labels, augmentation_points=batch.points,
                     trigger_logits=True).trigger_logits

    want = logits()  # eval mode, as generation
    model.train()
    got = logits()
    assert all(m.training for m in model.modules()), "the training mode is restored"
    torch.testing.assert_close(got, want)


def test_an_untrained_weaver_is_refused_unless_loaded_trained_or_insisted(tmp_path):
    model = make_model("qwen2", trigger_mode="lora")
    with pytest.raises(ValueError, match="neither trained nor loaded"):
        TriggerTrainer(model, _config(tmp_path / "a"), _prompts(2), reward=lambda t, y: 0.0)
    TriggerTrainer(model, _config(tmp_path / "b"), _prompts(2), reward=lambda t, y: 0.0, allow_untrained_weaver=True)
    save_base(model, tmp_path / "base")
    model.config.reasoner_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "ckpt")
    loaded = MemGenModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.weaver_trained
    TriggerTrainer(loaded, _config(tmp_path / "c"), _prompts(2), reward=lambda t, y: 0.0)
    fresh = make_model("qwen2", trigger_mode="lora").train()
    sft_trainer(fresh, _rows(8), _args(tmp_path / "d", max_steps=1)).train()
    assert fresh.weaver_trained
    TriggerTrainer(fresh, _config(tmp_path / "e"), _prompts(2), reward=lambda t, y: 0.0)


@pytest.mark.parametrize("mode", ["lora", "head"])
def test_the_invocation_rate_falls_when_invoking_costs_and_does_not_help(tmp_path, mode):
    model = make_model("qwen2", k_prompt=4, k_inference=2, trigger_mode=mode).train()
    with torch.no_grad():  # start undecided: P(invoke) = 0.5 at every decision point
        model.trigger.output_layer.weight.zero_()
        model.trigger.output_layer.bias.zero_()
    frozen = {k: v.detach().clone() for k, v in model.state_dict().items()
              if v.data_ptr() not in {p.data_ptr() for p in model.stage_parameters("trigger").values()}}
    trainer = TriggerTrainer(model, _config(tmp_path, max_steps=16, invoke_penalty=1.0, learning_rate=1e-2), _prompts(16),
                             reward=lambda text, target: 1.0, allow_untrained_weaver=True)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "invocation_rate" in h]
    rates = [h["invocation_rate"] for h in logged]
    assert len(rates) == 16 and all("shaped_reward" in h for h in logged)
    assert rates[0] > 0.35 and sum(rates[-3:]) / 3 < 0.15, rates  # step 0 is measured before any update
    for key, value in model.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key  # the reasoner and the weaver do not move


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="beta"):
        _config(tmp_path, beta=0.1)
    with pytest.raises(ValueError, match="invoke_penalty must be"):
        _config(tmp_path, invoke_penalty=-1.0)
    always = make_model("qwen2")
    with pytest.raises(ValueError, match="trains a `lora` or `head` trigger"):
        TriggerTrainer(always, _config(tmp_path), _prompts(2), reward=lambda t, y: 0.0, allow_untrained_weaver=True)
    with pytest.raises(ValueError, match="trigger_logits=True needs"):
        always(torch.tensor([[1, 2]]), trigger_logits=True)
    with pytest.raises(ValueError, match="need labels and the augmentation_points"):
        make_model("qwen2", trigger_mode="head")(torch.tensor([[1, 2]]), trigger_logits=True)


def test_trigger_rl_evaluates_on_eval_rows(tmp_path):
    model = chatty_model("qwen2", "lora", k_prompt=2, k_inference=2)
    trainer = TriggerTrainer(model, _config(tmp_path, max_new_tokens=8), _prompts(4), reward=lambda text, target: 1.0,
                             allow_untrained_weaver=True, eval_dataset=_prompts(2))
    metrics = trainer.evaluate()
    assert metrics["eval_reward"] == 1.0 and "eval_shaped_reward" in metrics and "eval_loss" in metrics
