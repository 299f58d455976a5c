"""GRPO for the weaver: masks, advantages, the clipped loss variants, rollouts replayed by the training
forward at their own insertion points, and the mean reward rising on a learnable reward."""

from __future__ import annotations

import pickle
import threading
import time

import datasets
import pytest
import torch

from memgen.adapters import tuner_layers
from memgen.evaluation import evaluate
from memgen.generation import completion_mask
from memgen.training.data import prompt_batch
from memgen.training.grpo import GRPOConfig, GRPOTrainer, clipped_loss, group_advantages, scored_all
from test_modeling import make_model


def test_completion_mask_ends_at_the_first_eos():
    new = torch.tensor([[5, 2, 9, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    assert completion_mask(new, [2]).tolist() == [[True, True, False, False], [True] * 4,
                                                   [True, False, False, False]]
    assert completion_mask(new, [9, 2])[0].tolist() == [True, True, False, False]


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0])
    a = 0.5 / (0.5 ** 0.5 + 1e-4)  # group (1, 0): mean 0.5, unbiased std sqrt(0.5)
    assert torch.allclose(group_advantages(rewards, 2), torch.tensor([a, -a, -a, a, 0.0, 0.0]))
    assert group_advantages(rewards, 2, scale=False).tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0]


def test_clipped_loss_variants_by_hand():
    logps = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    old = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, 0.0]])  # token 1 of row 0: ratio e > 1 + eps
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # per token: row 0: -min(r, clip(r)) * 1 = [-1, -1.2]; row 1: -min(-2, -2) = [2]
    grpo, clipped = clipped_loss(logps, old, adv, mask, 0.2, "grpo", max_len=3)
    assert grpo.item() == pytest.approx(((-1 - 1.2) / 2 + 2) / 2)
    assert clipped.item() == pytest.approx(1 / 3)
    assert clipped_loss(logps, old, adv, mask, 0.2, "bnpo", 3)[0].item() == pytest.approx((-1 - 1.2 + 2) / 3)
    assert clipped_loss(logps, old, adv, mask, 0.2, "dr_grpo", 3)[0].item() == pytest.approx((-1 - 1.2 + 2) / 6)
    kl = torch.ones(2, 3)
    assert clipped_loss(logps, old, adv, mask, 0.2, "bnpo", 3, kl, 0.5)[0].item() == pytest.approx((-0.2 + 1.5) / 3)


def test_gradient_of_the_unclipped_objective_is_the_policy_gradient():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = clipped_loss(logps, logps.detach(), torch.tensor([3.0]), torch.tensor([[True, True]]), 0.2, "bnpo", 2)
    loss.backward()
    assert logps.grad.tolist() == [[-1.5, -1.5]]  # -A / n_tokens for every token


@pytest.mark.parametrize("kwargs,match", [
    (dict(group_size=1), "group_size must be"), (dict(loss_type="ppo"), "loss_type must be one of"),
    (dict(temperature=0.0), "temperature must be a finite number > 0, got 0.0"),
    (dict(temperature="0.7"), "temperature must be a finite number > 0, got '0.7'"),
    (dict(epsilon=1.5), r"epsilon must be a finite number in \(0, 1\), got 1.5"),
    (dict(beta=float("nan")), "beta must be a finite number >= 0, got nan"),
    (dict(beta=-0.1), "beta must be a finite number >= 0, got -0.1"),
    (dict(remove_unused_columns=True), "remove_unused_columns must be False"),
    (dict(max_new_tokens=0), "max_new_tokens must be"),
    (dict(label_smoothing_factor=0.1), r"label_smoothing_factor \(0.1\) and neftune_noise_alpha"),
    (dict(neftune_noise_alpha=5.0), "act on a labelled loss"),
    (dict(accelerator_config={"dispatch_batches": True}), "dispatch_batches must be False"),
    (dict(reward_workers=0), "reward_workers must be an int >= 1, got 0"),
    (dict(reward_workers=2.0), "reward_workers must be an int >= 1, got 2.0"),
])
def test_config_checks(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)


def _config(tmp_path, config_class=GRPOConfig, **kw):
    """A small CPU run's settings (GRPOConfig, or a subclass such as TriggerConfig)."""
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4, group_size=8,
                max_new_tokens=6, learning_rate=3e-2, lr_scheduler_type="constant", logging_steps=1,
                save_strategy="no", disable_tqdm=True, log_level="error", seed=0, dataloader_num_workers=0)
    base.update(kw)
    return config_class(**base)


def _prompts(n):
    words = ["apple", "river", "stone", "cloud", "green", "seven", "north", "light"]
    return [{"prompt": "Q: " + " ".join(words[(3 * i + j) % 8] for j in range(2 + i % 3)) + ",", "target": None}
            for i in range(n)]


def test_rollouts_are_replayed_at_their_own_insertion_points(tmp_path):
    model = make_model("qwen2", k_prompt=4, k_inference=2, max_inference=3)
    table = model.delimiter_table
    trainer = GRPOTrainer(model, _config(tmp_path, temperature=1e-4, max_new_tokens=12), _prompts(4),
                          reward=lambda text, target: 0.0)
    batch = trainer.rollouts(_prompts(3))
    assert batch.input_ids.shape[0] == 3 * 8 and (batch.points.sum(1) >= 1).all()  # the prompt weave at least
    assert (batch.decided[batch.completion] == 1).any() and table.any()
    logits = model(batch.input_ids, batch.attention_mask, batch.labels, augmentation_points=batch.points).logits
    predicted = logits[:, :-1].argmax(-1)
    completion = batch.completion[:, 1:]
    assert torch.equal(predicted[completion], batch.input_ids[:, 1:][completion])  # near-greedy tokens, replayed


def test_rollouts_end_at_stop_strings(tmp_path):
    """A rollout that writes a stop string ends there: the pad after it is neither scored nor trained (the chat
    tokenizer's pad token is not its EOS, so only the engine's completion mask tells it apart)."""
    model = make_model("qwen2", k_prompt=4, k_inference=2, max_inference=3)
    tok, rows = model.tokenizer, _prompts(2)
    free = GRPOTrainer(model, _config(tmp_path, max_new_tokens=12), rows, reward=lambda t, y: 0.0).rollouts(rows)
    tokens = free.input_ids[0][free.completion[0]].tolist()
    # a token of row 0's, from its middle on, that is plain text (random weights write partial UTF-8 too)
    stop = next(text for t in tokens[len(tokens) // 2:] + tokens
                if (text := tok.decode([t])).isascii() and text.isprintable() and text.strip())
    scored = []
    trainer = GRPOTrainer(model, _config(tmp_path, max_new_tokens=12, stop_strings=[stop]), rows,
                          reward=lambda text, target: scored.append(text) or 0.0)
    batch = trainer.rollouts(rows)  # the same step and seed: the same draws
    stopped = 0
    for i in range(len(free.texts)):
        tokens = free.input_ids[i][free.completion[i]].tolist()
        cut = next((t + 1 for t in range(len(tokens)) if stop in tok.decode(tokens[:t + 1], skip_special_tokens=True)),
                   len(tokens))
        assert batch.input_ids[i][batch.completion[i]].tolist() == tokens[:cut], i
        assert batch.texts[i] == tok.decode(tokens[:cut], skip_special_tokens=True)
        stopped += cut < len(tokens)
    assert stopped >= 1 and scored == batch.texts
    with pytest.raises(ValueError, match="stop_strings must be a non-empty list of non-empty strings"):
        _config(tmp_path, stop_strings="Q:")


def test_rollout_prompts_render_with_chat_template_kwargs(tmp_path):
    from test_sft import THINKING

    model = make_model("qwen2")
    model.tokenizer.chat_template = THINKING
    rows = _prompts(2)
    trainer = GRPOTrainer(model, _config(tmp_path, chat_template_kwargs={"enable_thinking": False}), rows,
                          reward=lambda text, target: 0.0)
    batch = trainer.rollouts(rows)
    prompt = batch.input_ids[0][batch.attention_mask[0].bool() & ~batch.completion[0]]
    assert model.tokenizer.decode(prompt).endswith("<|im_start|>assistant\n<think></think>")
    with pytest.raises(ValueError, match=r"\['enable_thinkng'\] are not variables of the tokenizer's chat template"):
        GRPOTrainer(model, _config(tmp_path, chat_template_kwargs={"enable_thinkng": False}), rows,
                    reward=lambda text, target: 0.0)
    with pytest.raises(ValueError, match="chat_template_kwargs must be a mapping"):
        _config(tmp_path, chat_template_kwargs="enable_thinking")


def test_grpo_raises_the_mean_reward_on_a_learnable_reward(tmp_path):
    """Reward: the one new token is one of a fixed quarter of the vocabulary (tokens that decode to clean text,
    so that the text identifies the token). The random reasoner's LM head is sharpened 10x: with its initial
    scale every next-token distribution is nearly uniform and no latent can move it."""
    model = make_model("qwen2", k_prompt=4, k_inference=2).train()
    with torch.no_grad():
        model.reasoner.lm_head.weight.mul_(10.0)
    tok = model.tokenizer
    texts = {t: tok.decode([t]) for t in range(len(tok)) if t not in tok.all_special_ids}
    allowed = {s for t, s in texts.items() if t % 4 == 3 and s and "\ufffd" not in s}

    reasoner = {k: v.clone() for k, v in model.reasoner.state_dict().items() if "lora_" not in k}
    trainer = GRPOTrainer(model, _config(tmp_path, max_steps=16, max_new_tokens=1), _prompts(16),
                          reward=lambda text, target: float(text in allowed))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "reward" in h]
    rewards = [h["reward"] for h in logged]
    assert len(rewards) == 16 and all("invocation_rate" in h and "clip_ratio" in h for h in logged)
    assert rewards[0] < 0.5 and sum(rewards[-4:]) / 4 > 0.9, rewards
    for key, value in model.reasoner.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, reasoner[key]), key


def test_kl_to_the_initial_weaver_is_logged_and_starts_at_zero(tmp_path):
    model = make_model("qwen2", k_prompt=4, k_inference=2).train()
    trainer = GRPOTrainer(model, _config(tmp_path, max_steps=2, beta=0.1, loss_type="bnpo"), _prompts(8),
                          reward=lambda text, target: float(len(text) % 2))
    trainer.train()
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(kls) == 2 and kls[0] == pytest.approx(0.0, abs=1e-6) and kls[1] >= 0.0


def test_the_kl_reference_runs_without_dropout(tmp_path):
    """The initial weaver's log-probabilities come from eval mode (the reference implementation's frozen copy):
    with LoRA dropout 0.5 they are the same on every call and equal an eval-mode forward; the model keeps its
    training mode."""
    model = make_model("qwen2", k_prompt=4, k_inference=2)
    for layer in tuner_layers(model.weaver.model):
        if "weaver" in layer.lora_dropout:
            layer.lora_dropout["weaver"] = torch.nn.Dropout(0.5)
    model.train()
    trainer = GRPOTrainer(model, _config(tmp_path, beta=0.1), _prompts(4), reward=lambda text, target: 0.0)
    batch = trainer.rollouts(_prompts(2))
    first, second = trainer._reference_logps(batch), trainer._reference_logps(batch)
    assert all(m.training for m in model.modules()), "the training mode is restored"
    with torch.no_grad():
        assert not torch.equal(trainer._policy_logps(model, batch), trainer._policy_logps(model, batch))  # dropout
        model.eval()
        want = trainer._policy_logps(model, batch)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, want)


def test_bad_arguments(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="args must be a GRPOConfig"):
        GRPOTrainer(model, object(), _prompts(2), reward=lambda t, y: 0.0)
    with pytest.raises(ValueError, match="reward must be a callable"):
        GRPOTrainer(model, _config(tmp_path), _prompts(2), reward=None)
    with pytest.raises(ValueError, match=r"rows need a 'prompt' .* and a 'target' .*got \['answer', 'question'\]"):
        GRPOTrainer(model, _config(tmp_path), [{"question": "q", "answer": "a"}], reward=lambda t, y: 0.0)
    with pytest.raises(ValueError, match=r"needs 'prompt' and 'target' columns .*got \['answer', 'question'\]"):
        GRPOTrainer(model, _config(tmp_path), datasets.Dataset.from_list([{"question": "q", "answer": "a"}]),
                    reward=lambda t, y: 0.0)
    def rows_without_targets():
        yield from [{"prompt": "q"}] * 2

    streamed = datasets.IterableDataset.from_generator(rows_without_targets)  # no columns known: checked as read
    with pytest.raises(ValueError, match=r"rows need a 'prompt' .* and a 'target' .*got \['prompt'\]"):
        GRPOTrainer(model, _config(tmp_path, max_steps=1, group_size=2), streamed, reward=lambda t, y: 0.0).train()
    with pytest.raises(ValueError, match="compute_loss_func: GRPO computes its own loss"):
        GRPOTrainer(model, _config(tmp_path), _prompts(2), reward=lambda t, y: 0.0, compute_loss_func=lambda *a: 0)


@pytest.mark.parametrize("value,match", [(float("nan"), "must return a finite number, got nan"),
                                         (float("inf"), "must return a finite number, got inf"),
                                         (None, "must return a real number, got NoneType"),
                                         ("1.0", "must return a real number, got str")])
def test_a_reward_that_is_not_a_finite_number_is_refused(tmp_path, value, match):
    """A NaN reward made its group's advantages, and then the weights, NaN without an error."""
    trainer = GRPOTrainer(make_model(), _config(tmp_path, max_steps=1, group_size=2), _prompts(2),
                          reward=lambda text, target: value)
    with pytest.raises(ValueError, match=match + r".* for the completion '.*' \(target None\)"):
        trainer.train()


def test_rewards_may_be_bools_or_one_element_tensors(tmp_path):
    for value in (True, torch.tensor(0.5)):
        trainer = GRPOTrainer(make_model(), _config(tmp_path, max_steps=1, group_size=2), _prompts(2),
                              reward=lambda text, target: value)
        assert trainer.rollouts(_prompts(2)).rewards.tolist() == [float(value)] * 4


def _meeting_reward(parties):
    """A reward that returns only once `parties` calls are under way at the same time (a barrier), so that it
    scores in threads or raises BrokenBarrierError; the score of (text, target) is len(text) + target."""
    barrier = threading.Barrier(parties, timeout=10)

    def reward(text, target):
        time.sleep(0.01 * (target % 3))  # calls end out of order
        barrier.wait()
        return len(text) + target
    return reward


def test_scored_all_runs_workers_at_once_and_keeps_the_order():
    texts, targets = ["a", "bb", "ccc", "dddd", "", "ff", "g", "hhhhhhh"], [5, 1, 4, 2, 0, 3, 7, 6]
    expected = [float(len(t) + y) for t, y in zip(texts, targets)]
    assert scored_all(lambda t, y: len(t) + y, texts, targets) == expected
    assert scored_all(_meeting_reward(4), texts, targets, workers=4) == expected
    with pytest.raises(threading.BrokenBarrierError):  # the barrier's test is not vacuous: one at a time never meets
        scored_all(_meeting_reward(2), texts[:2], targets[:2], workers=1)


def test_scored_all_raises_the_first_error_and_starts_no_more_calls():
    started = []

    def reward(text, target):
        started.append(text)
        if text == "bad":
            return float("nan")
        time.sleep(0.05)
        return 1.0
    texts = ["bad"] + [str(i) for i in range(40)]
    with pytest.raises(ValueError, match="must return a finite number, got nan for the completion 'bad'"):
        scored_all(reward, texts, [None] * len(texts), workers=2)
    assert len(started) < len(texts)  # the queued calls were dropped
    with pytest.raises(ValueError, match="texts and targets differ in length: 2 and 1"):
        scored_all(reward, ["a", "b"], [None], workers=2)
    with pytest.raises(ValueError, match="reward_workers must be an int >= 1, got 0"):
        scored_all(reward, ["a"], [None], workers=0)


def test_rollouts_and_evaluate_score_in_reward_workers(tmp_path):
    model = make_model()
    trainer = GRPOTrainer(model, _config(tmp_path, group_size=2, reward_workers=4), _prompts(2),
                          reward=lambda t, y: 0.0)
    trainer.reward = _meeting_reward(4)  # 2 rows x 2 rollouts meet only when scored at once
    batch = trainer.rollouts([{**row, "target": i} for i, row in enumerate(_prompts(2))])
    assert batch.rewards.tolist() == [float(len(t) + i // 2) for i, t in enumerate(batch.texts)]
    rows = [{**row, "target": i} for i, row in enumerate(_prompts(3))]
    plain = evaluate(model, rows, lambda t, y: len(t) + y, max_new_tokens=4, batch_size=3)
    assert evaluate(model, rows, _meeting_reward(3), max_new_tokens=4, batch_size=3, reward_workers=3) == plain
    with pytest.raises(ValueError, match="reward_workers must be an int >= 1, got 0"):
        evaluate(model, rows, lambda t, y: 0.0, reward_workers=0)


def test_evaluation_samples_the_eval_rows_and_logs_their_reward_apart(tmp_path):
    """An eval_dataset crashed evaluation (Trainer's prediction_step took GRPO's rows for a dict of tensors). Each
    evaluation batch samples its own rollouts; their reward is logged as eval_reward, and the training logs keep the
    training rollouts' own."""
    seen = {"train": [], "eval": []}
    trainer = None

    def reward(text, target):
        value = float(len(text) % 3)
        seen["train" if trainer.model.training else "eval"].append(value)
        return value

    eval_rows = [{"prompt": p["prompt"] + " eval", "target": None} for p in _prompts(3)]
    trainer = GRPOTrainer(make_model(), _config(tmp_path, max_steps=1, group_size=2, per_device_eval_batch_size=2,
                                                eval_strategy="steps", eval_steps=1),
                          _prompts(4), reward=reward, eval_dataset=eval_rows)
    trainer.train()
    assert len(seen["eval"]) == 3 * 2  # every eval row, group_size rollouts each, in two batches
    metrics = trainer.evaluate()
    assert len(seen["eval"]) == 12
    # batches of 2 rows and 1 row, 2 rollouts each: the mean over the 6 rollouts (it was the mean of the two batches'
    # means, which weighed the short last batch's rollouts twice)
    assert metrics["eval_reward"] == pytest.approx(sum(seen["eval"][6:]) / 6)
    assert "eval_loss" in metrics and "eval_invocation_rate" in metrics
    assert trainer.predict(eval_rows).metrics["test_reward"] == pytest.approx(
        sum(seen["eval"][12:]) / 6)  # predict's prefix, never logged
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert train_logs[0]["reward"] == pytest.approx(sum(seen["train"]) / len(seen["train"]))
    assert not any(k.startswith(("eval_", "test_")) for h in train_logs for k in h)
    assert not any("reward" in k for h in trainer.state.log_history if "train_loss" in h for k in h)


def test_conversation_prompts_continue_through_the_chat_template(tmp_path):
    """A row's prompt may be a conversation (TRL's conversational format): rendered by the chat template with the
    assistant's generation prompt, as a string prompt is as one user turn."""
    from test_sft import CHATML

    model = make_model()
    tok = model.tokenizer
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: apple, river"}]
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        prompt_batch(tok, [conversation])
    tok.chat_template = CHATML
    ids, mask = prompt_batch(tok, [conversation, "Q: stone"])
    want = tok(tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]
    assert ids[0][mask[0].bool()].tolist() == want
    assert ids[1][mask[1].bool()].tolist() == tok(tok.apply_chat_template(
        [{"role": "user", "content": "Q: stone"}], tokenize=False, add_generation_prompt=True))["input_ids"]
    rows = [{"prompt": conversation, "target": None}, {"prompt": "Q: stone", "target": None}]
    trainer = GRPOTrainer(model, _config(tmp_path, max_steps=1, group_size=2), rows, reward=lambda t, y: len(t) % 2)
    trainer.train()
    assert evaluate(model, rows, lambda t, y: 1.0, max_new_tokens=3)["rows"] == 2
    with pytest.raises(ValueError, match="rows need a 'prompt' .* and a 'target'"):
        GRPOTrainer(model, _config(tmp_path), [{"prompt": [{"role": "user"}], "target": None}], reward=lambda t, y: 0)


def test_the_policy_gradient_scores_tokens_at_the_sampling_temperature(tmp_path):
    """Rollouts sampled at temperature T come from softmax(logits / T); their log-probabilities (and so the policy
    gradient and the KL) were taken under softmax(logits), a policy that sampled nothing, wherever T != 1."""
    model = make_model("qwen2", k_prompt=4, k_inference=2)
    trainer = GRPOTrainer(model, _config(tmp_path, group_size=2, temperature=0.5), _prompts(2),
                          reward=lambda t, y: 0.0)
    batch = trainer.rollouts(_prompts(2))
    logps = trainer._policy_logps(model, batch)
    logits = model(batch.input_ids, batch.attention_mask, batch.labels, augmentation_points=batch.points).logits
    want = torch.zeros_like(logps)
    want[:, 1:] = torch.log_softmax(logits[:, :-1].float() / 0.5, -1).gather(
        -1, batch.input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logps[batch.completion], want[batch.completion], rtol=1e-5, atol=1e-5)


def test_the_collator_pickles_for_loader_workers(tmp_path):
    """Data loader workers started by spawn or forkserver (Python 3.14's default on Linux) unpickle the collator,
    which was a lambda."""
    trainer = GRPOTrainer(make_model(), _config(tmp_path), _prompts(2), reward=lambda t, y: 0.0)
    rows = _prompts(3)
    assert pickle.loads(pickle.dumps(trainer.data_collator))(rows) == rows


def test_grpo_on_a_streamed_dataset(tmp_path):
    """Unset, accelerate had the first rank read a streamed dataset's rows and broadcast them, which takes tensors
    only: GRPO's text rows failed in accelerate's find_batch_size."""
    import datasets

    model = make_model("qwen2", k_prompt=4, k_inference=2)
    weaver = {k: v.detach().clone() for k, v in model.stage_parameters("weaver").items()}
    rows = datasets.Dataset.from_list(_prompts(4)).to_iterable_dataset()
    GRPOTrainer(model, _config(tmp_path, max_steps=1, group_size=2), rows,
                reward=lambda text, target: float(len(text) % 3 == 0)).train()
    assert any(not torch.equal(p, weaver[k]) for k, p in model.stage_parameters("weaver").items())


def test_resuming_grpo_continues_exactly(tmp_path):
    """Rollouts are sampled from seeds tied to the global step, and the optimizer and random states come back
    from the checkpoint, so a run resumed at step 2 ends where an uninterrupted run does."""
    def run(path, resume=None):
        model = make_model("qwen2", k_prompt=4, k_inference=2).train()
        trainer = GRPOTrainer(model, _config(path, max_steps=4, save_strategy="steps", save_steps=2), _prompts(8),
                              reward=lambda text, target: float(len(text) % 3 == 0))
        trainer.train(resume_from_checkpoint=resume)
        return model, [h["reward"] for h in trainer.state.log_history if "reward" in h]

    full, rewards = run(tmp_path / "a")
    resumed, resumed_rewards = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed_rewards == rewards  # steps 1-2 come back with the trainer state; 3-4 are sampled again, alike
    for (name, a), b in zip(full.stage_parameters("weaver").items(), resumed.stage_parameters("weaver").values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_a_kl_term_on_a_sharded_model_is_refused_with_a_clear_error():
    from types import SimpleNamespace

    from memgen.training.grpo import check_sharding

    def trainer(fsdp=False, deepspeed_stage=None, beta=0.0):
        state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=deepspeed_stage))
        return SimpleNamespace(is_fsdp_enabled=fsdp, is_deepspeed_enabled=deepspeed_stage is not None,
                               accelerator=SimpleNamespace(state=state), args=SimpleNamespace(beta=beta))

    for supported in (trainer(), trainer(deepspeed_stage=2), trainer(deepspeed_stage=3), trainer(fsdp=True),
                      trainer(beta=0.1), trainer(deepspeed_stage=2, beta=0.1)):
        check_sharding(supported)
    for sharded in (trainer(fsdp=True, beta=0.1), trainer(deepspeed_stage=3, beta=0.1)):
        with pytest.raises(ValueError, match="beta > 0"):
            check_sharding(sharded)
