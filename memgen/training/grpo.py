"""GRPO for the weaver (DESIGN.md section 1, "Training procedures").

Each step takes a batch of prompts and, for each, samples `group_size` rollouts with memgen's engine
(`always` trigger, the weaver's current weights). It then scores each completion with the reward
function and normalises rewards within each group into advantages. Finally it recomputes the
completion tokens' log-probabilities with the training forward at the *same* insertion points the
rollout used (`augmentation_points`). The loss is PPO's clipped ratio, with an optional KL to the
initial weaver (`beta`), aggregated as `grpo` (mean per sequence, then over sequences), `bnpo` (mean
over all tokens) or `dr_grpo` (sum over tokens / (sequences x max_new_tokens); advantages not
divided by the group's standard deviation).

A completion ends at its first EOS: the mask that weighs its tokens includes that EOS and nothing
after it (the reference code padded with EOS and masked nothing, which clipped everything).

Under FSDP the rollouts gather the root's own parameters once and keep the ranks in step (the
engine's `synced_ranks`), so ranks whose rollouts end or weave at different steps do not deadlock.
Under DeepSpeed ZeRO-3 they gather the whole model on each rank for their duration
(`memgen.sharding.gathered_for_decoding`) and make no collective calls.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import torch
from transformers import TrainingArguments

from memgen.modes import evaluating
from memgen.sharding import gathered_for_decoding
from memgen.training.data import (MemGenCollator, check_prompt_rows, check_template_mapping, prompt_batch,
                                  template_kwargs)
from memgen.training.trainer import MemGenTrainer

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


@dataclass
class GRPOConfig(TrainingArguments):
    """`TrainingArguments` plus GRPO's settings. `per_device_train_batch_size` counts prompts; each
    prompt yields `group_size` rollouts."""

    group_size: int = field(default=8, metadata={"help": "rollouts per prompt (G)"})
    max_new_tokens: int = field(default=256, metadata={"help": "completion length limit"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts"})
    beta: float = field(default=0.0, metadata={"help": "weight of the KL to the initial weaver"})
    epsilon: float = field(default=0.2, metadata={"help": "clipping range of the probability ratio"})
    loss_type: str = field(default="grpo", metadata={"help": "grpo | bnpo | dr_grpo"})
    eos_token_ids: list[int] | None = field(default=None, metadata={"help": "default: the tokenizer's EOS"})
    stop_strings: list[str] | None = field(default=None, metadata={
        "help": "a rollout also ends once its text ends with one of these (a base model's run-on 'Question:'); "
                "what follows is neither scored nor trained"})
    chat_template_kwargs: dict | None = field(default=None, metadata={
        "help": "extra variables for the chat template that renders the prompts (Qwen3's {'enable_thinking': False})"})
    logps_chunk_size: int = field(default=1024, metadata={
        "help": "completion tokens whose vocabulary-wide logits exist at once (backward recomputes them)"})
    reward_workers: int = field(default=1, metadata={
        "help": "threads that score a step's rollouts at once: rewards that wait on a process of their own (the code "
                "tasks' sandbox) overlap; above 1 only for a reward function that is safe to call from threads"})
    remove_unused_columns: bool = False  # rows carry prompt and target, which forward does not take

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"group_size must be an int >= 2 (advantages compare rollouts), got {self.group_size!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        check_number("temperature", self.temperature, lambda v: v > 0, "> 0")
        check_number("beta", self.beta, lambda v: v >= 0, ">= 0")
        check_number("epsilon", self.epsilon, lambda v: 0 < v < 1, "in (0, 1)")
        check_count("reward_workers", self.reward_workers)
        check_template_mapping(self.chat_template_kwargs)
        if self.stop_strings is not None and not (isinstance(self.stop_strings, list) and self.stop_strings
                                                  and all(isinstance(x, str) and x for x in self.stop_strings)):
            raise ValueError(f"stop_strings must be a non-empty list of non-empty strings, got {self.stop_strings!r}")
        if not isinstance(self.logps_chunk_size, int) or self.logps_chunk_size < 1:
            raise ValueError(f"logps_chunk_size must be an int >= 1, got {self.logps_chunk_size!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False: GRPO reads the rows' prompt and target")
        if self.accelerator_config.dispatch_batches:
            raise ValueError("accelerator_config.dispatch_batches must be False: the first rank would read every "
                             "rank's rows and broadcast them, which takes tensors only, and GRPO's rows carry text")
        if self.label_smoothing_factor or self.neftune_noise_alpha is not None:
            raise ValueError(f"label_smoothing_factor ({self.label_smoothing_factor!r}) and neftune_noise_alpha "
                             f"({self.neftune_noise_alpha!r}) act on a labelled loss and its inputs: GRPO's loss is on "
                             "its rollouts' own log-probabilities, which noise in the training forward alone would "
                             "bias. Leave them unset")


def check_sharding(trainer: Any) -> None:
    """Raise for a KL term (`beta` > 0) on a sharded model (FSDP, DeepSpeed ZeRO-3): it swaps the initial
    weaver's whole tensors into parameters that are sharded."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None) if trainer.is_deepspeed_enabled else None
    zero3 = plugin is not None and getattr(plugin, "zero_stage", 0) == 3
    if (trainer.is_fsdp_enabled or zero3) and getattr(trainer.args, "beta", 0.0) > 0:
        raise ValueError("beta > 0 (KL to the initial weaver) is not supported under FSDP or DeepSpeed ZeRO-3; use "
                         "beta=0, or DDP / ZeRO-1/2")


def check_number(name: str, value: Any, holds: Callable[[float], bool], expected: str) -> None:
    """Raise unless `value` is a finite real number (not a bool, not a string such as YAML's quoted '0.7') for which
    `holds` is true; comparing a string would raise a TypeError that names no setting, and NaN passes a comparison
    that is written to refuse."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not holds(value):
        raise ValueError(f"{name} must be a finite number {expected}, got {value!r}")


def check_count(name: str, value: Any) -> None:
    """Raise unless `value` (the setting `name`: threads, processes, a length) is an int >= 1, not a bool."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def scored(reward: Callable[[str, Any], Any], text: str, target: Any) -> float:
    """`reward(text, target)`, refused unless a finite real number (a bool or a one-element tensor too): in GRPO a
    NaN or infinite reward would turn every advantage of its group, and then the trained weights, into NaN."""
    value = reward(text, target)
    if not isinstance(value, numbers.Real) and not (torch.is_tensor(value) and value.numel() == 1):
        raise ValueError(f"reward must return a real number, got {type(value).__name__} ({value!r:.80}) for the "
                         f"completion {text[:80]!r} (target {target!r:.80})")
    if not math.isfinite(float(value)):
        raise ValueError(f"reward must return a finite number, got {float(value)} for the completion {text[:80]!r} "
                         f"(target {target!r:.80})")
    return float(value)


def scored_all(reward: Callable[[str, Any], Any], texts: Sequence[str], targets: Sequence[Any],
               workers: int = 1) -> list[float]:
    """`scored` for each (text, target), in order. With `workers` > 1 that many calls run at once in threads, so
    that rewards which wait on a process of their own (a sandboxed test run takes ~40 ms, up to its timeout for code
    that hangs) overlap; the first error raised is raised here, and calls not yet started are dropped."""
    check_count("reward_workers", workers)
    if len(texts) != len(targets):
        raise ValueError(f"texts and targets differ in length: {len(texts)} and {len(targets)}")
    if workers == 1 or len(texts) < 2:
        return [scored(reward, text, target) for text, target in zip(texts, targets)]
    pool = ThreadPoolExecutor(min(workers, len(texts)), thread_name_prefix="memgen-reward")
    try:
        return list(pool.map(scored, repeat(reward), texts, targets))
    finally:
        pool.shutdown(cancel_futures=True)


def completions(tokenizer: Any, out: Any, prompt_width: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(new tokens [B, T] on the CPU, the completion mask of them, each completion's text through the token that
    finished it): what a reward scores, from `generate`'s output (`MemGenGenerateOutput`) for prompts
    `prompt_width` wide."""
    new, keep = out.sequences[:, prompt_width:].cpu(), out.completion_mask.cpu()
    return new, keep, [tokenizer.decode(row[kept], skip_special_tokens=True) for row, kept in zip(new, keep)]


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """(reward - its group's mean), divided by the group's standard deviation (+1e-4) when `scale`."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(1, keepdim=True) + 1e-4)
    return centred.flatten()


def clipped_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 epsilon: float, loss_type: str, max_len: int, kl: torch.Tensor | None = None,
                 beta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per token [B, T], aggregated by `loss_type`; also the clipped fraction."""
    ratio = torch.exp(logps - old_logps)
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * advantages[:, None], clipped * advantages[:, None])
    if kl is not None:
        per_token = per_token + beta * kl
    mask = mask.float()
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    else:
        loss = (per_token * mask).sum() / (mask.shape[0] * max_len)
    is_clipped = ((ratio < 1 - epsilon) & (advantages[:, None] < 0)) | ((ratio > 1 + epsilon) & (advantages[:, None] > 0))
    return loss, (is_clipped.float() * mask).sum() / mask.sum().clamp(min=1)


@dataclass
class Rollouts:
    """A step's rollouts, repacked for the training forward: each row left-padded as prompt + completion.

    input_ids, attention_mask, labels (completion tokens, -100 elsewhere), decided (the trigger's
    decision taken before each completion token: -100 none, 0 SKIP, 1 INVOKE), points (decided == 1,
    where the rollout wove memory): [B, L]. completion: bool [B, L] of the completion tokens. rewards,
    scores (what the advantages were computed from), advantages: [B].
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    decided: torch.Tensor
    points: torch.Tensor
    completion: torch.Tensor
    rewards: torch.Tensor
    scores: torch.Tensor
    advantages: torch.Tensor
    texts: list[str]


def rows_as_given(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """GRPO's collator: a batch is its rows (prompts are encoded with the rollouts). A function, not a lambda, so
    that data loader workers started by spawn or forkserver can unpickle it."""
    return rows


class GRPOTrainer(MemGenTrainer):
    """GRPO on a MemGen stage, through Hugging Face `Trainer` (DDP and `torchrun` work as for any Trainer).

    train_dataset: rows with `prompt` (a string, one user turn; or a conversation, a list of {'role', 'content'}
    messages that the chat template continues) and `target` (anything the reward takes), e.g. from
    `memgen.tasks.load_task`. reward: (completion text, target) -> float, e.g. `TASKS["gsm8k"].reward`.
    """

    stage_name = "weaver"

    def __init__(self, model: Any, args: GRPOConfig, train_dataset: Any, reward: Callable[[str, Any], float],
                 **kwargs: Any) -> None:
        if not isinstance(args, GRPOConfig):
            raise ValueError(f"args must be a GRPOConfig, got {type(args).__name__}")
        if not callable(reward):
            raise ValueError("reward must be a callable (completion text, target) -> float")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func: GRPO computes its own loss (the clipped objective on its rollouts)")
        template_kwargs(model.tokenizer, args.chat_template_kwargs)  # before any work: the prompts' rendering
        if isinstance(train_dataset, (list, tuple)):
            check_prompt_rows(train_dataset, "GRPO")
        columns = getattr(train_dataset, "column_names", None)  # a streamed dataset may not know them yet
        if columns is not None and not {"prompt", "target"} <= set(columns):
            raise ValueError(f"train_dataset needs 'prompt' and 'target' columns (as memgen.tasks.load_task gives), "
                             f"got {sorted(columns)}")
        super().__init__(model, args, stage=self.stage_name, train_dataset=train_dataset,
                         data_collator=rows_as_given, **kwargs)
        check_sharding(self)
        self.reward = reward
        self.initial_state = {k: p.detach().clone() for k, p in model.stage_parameters(self.stage_name).items()} \
            if args.beta > 0 else None
        self._metrics: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}  # [value x weight, weight] sums
        self._eval_draws = 0  # evaluation batches sampled so far: each draws its own rollouts

    # ------------------------------------------------------------------ rollouts

    def generation_kwargs(self) -> dict[str, Any]:
        """How rollouts are sampled (the trigger stage samples its decisions too)."""
        return {"trigger_mode": "always"}

    def rollouts(self, rows: list[dict[str, Any]], draw: int = 0) -> Rollouts:
        """Sample `group_size` completions per row and score them; no gradients. `draw` tells apart the samplings of
        one step on one rank (0: the training rollouts; evaluation batches count from 1)."""
        check_prompt_rows(rows, "GRPO")
        model = self.accelerator.unwrap_model(self.model)
        tok, device, g = model.tokenizer, model.device, self.args.group_size
        ids, mask = prompt_batch(tok, [r["prompt"] for r in rows], self.args.chat_template_kwargs)
        width = ids.shape[1]
        prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask) for _ in range(g)]
        eos = self.args.eos_token_ids or [tok.eos_token_id]
        seed = (self.args.seed + 1_000_003 * (self.state.global_step * self.args.world_size + self.args.process_index)
                + 7_919 * draw)
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad(), evaluating(model), gathered_for_decoding(self.model_wrapped):
            out = model.generate(ids.to(device), mask.to(device), max_new_tokens=self.args.max_new_tokens,
                                 do_sample=True, temperature=self.args.temperature, generator=generator,
                                 num_return_sequences=g, eos_token_id=eos, return_dict_in_generate=True,
                                 stop_strings=self.args.stop_strings, **self.generation_kwargs())
        new, keep, texts = completions(tok, out, width)
        targets = [r["target"] for r in rows for _ in range(g)]
        rewards = torch.tensor(scored_all(self.reward, texts, targets, self.args.reward_workers), dtype=torch.float32)
        decisions = torch.where(keep, out.augmentation_mask.cpu(), -100)
        scores = self.scores(rewards, decisions)
        advantages = group_advantages(scores, g, scale=self.args.loss_type != "dr_grpo")
        return self._repack(prompts, new, keep, decisions, rewards, scores, advantages, texts, device,
                            tok.pad_token_id)

    def scores(self, rewards: torch.Tensor, decisions: torch.Tensor) -> torch.Tensor:
        """What advantages are computed from: the rewards themselves (the trigger stage shapes them)."""
        return rewards

    @staticmethod
    def _repack(prompts, new, keep, decisions, rewards, scores, advantages, texts, device, pad_id) -> Rollouts:
        completions = [new[b][keep[b]].tolist() for b in range(len(prompts))]
        padded = MemGenCollator(pad_id)([{"input_ids": p + c, "labels": [-100] * len(p) + c}
                                         for p, c in zip(prompts, completions)])
        labels = padded["labels"]
        decided = torch.full_like(labels, -100)
        decided[labels != -100] = decisions[keep]  # each completion token's decision, in row order
        return Rollouts(padded["input_ids"].to(device), padded["attention_mask"].to(device), labels.to(device),
                        decided.to(device), (decided == 1).long().to(device), (labels != -100).to(device),
                        rewards.to(device), scores.to(device), advantages.to(device), texts)

    # ------------------------------------------------------------------ loss

    def _reference_logps(self, batch: Rollouts) -> torch.Tensor:
        """Token log-probs under the initial weaver (its tensors swapped in for one no-grad forward).

        In eval mode, as the reference implementation's frozen reference copy (TRL's `create_reference_model`)
        runs: no LoRA dropout, so the KL term measures the drift of the weights, not a dropout draw.
        """
        model = self.accelerator.unwrap_model(self.model)
        params = model.stage_parameters(self.stage_name)
        current = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad(), evaluating(model):
            for k, p in params.items():
                p.copy_(self.initial_state[k])
            try:
                return self._policy_logps(model, batch)
            finally:
                for k, p in params.items():
                    p.copy_(current[k])

    def _policy_logps(self, model: Any, batch: Rollouts) -> torch.Tensor:
        """[B, L] the completion tokens' log-probabilities, replayed at the rollouts' insertion points, under the
        distribution the rollouts were sampled from (the logits at the sampling temperature), as the policy gradient
        needs; the trigger stage scores its decisions the same way."""
        return model(batch.input_ids, batch.attention_mask, batch.labels, augmentation_points=batch.points,
                     token_logps=True, logps_chunk_size=self.args.logps_chunk_size,
                     logps_temperature=self.args.temperature).token_logps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = self.rollouts(inputs)
        loss, clipped, kl, outputs = self._loss(model, batch)
        self._record(batch, clipped, kl)
        return (loss, outputs) if return_outputs else loss

    def _loss(self, model: Any, batch: Rollouts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Any]:
        """(loss, clipped fraction, per-token KL or None, the outputs compute_loss returns) of a step's rollouts."""
        # before the policy's forward: swapping the initial tensors in afterwards would alter its saved graph
        reference = self._reference_logps(batch) if self.args.beta > 0 else None
        logps = self._policy_logps(model, batch)
        kl = None
        if reference is not None:
            delta = reference - logps
            kl = torch.exp(delta) - delta - 1  # k3 estimator of KL(policy || initial weaver), >= 0
        loss, clipped = clipped_loss(logps, logps.detach(), batch.advantages, batch.completion, self.args.epsilon,
                                     self.args.loss_type, self.args.max_new_tokens, kl, self.args.beta)
        return loss, clipped, kl, logps

    # The rollout metrics logged (with the evaluation's prefix in evaluation), in the order every rank sums them.
    rollout_metrics = ("reward", "reward_std", "completion_length", "insertions_per_response", "invocation_rate",
                       "clip_ratio", "kl")

    def _record(self, batch: Rollouts, clipped: torch.Tensor, kl: torch.Tensor | None) -> None:
        """Record a batch's rollout metrics, each with what it is a mean over (rollouts, decisions, tokens), so
        that a log gives the mean over every rollout since the last one, on every rank (not the mean of batch
        means, which weighs a short last batch more)."""
        rollouts, decided, tokens = len(batch.rewards), (batch.decided >= 0).sum(), batch.completion.sum()
        self._metric("reward", batch.rewards.mean(), rollouts)
        self._metric("reward_std", batch.rewards.std(), rollouts)
        self._metric("completion_length", tokens / rollouts, rollouts)
        self._metric("insertions_per_response", batch.points.sum() / rollouts, rollouts)
        self._metric("invocation_rate", batch.points.sum() / decided.clamp(min=1), decided)
        self._metric("clip_ratio", clipped, self._clipped_over(batch))
        if kl is not None:
            self._metric("kl", (kl.detach() * batch.completion).sum() / tokens.clamp(min=1), tokens)

    def _clipped_over(self, batch: Rollouts) -> torch.Tensor:
        """How many positions the clipped fraction of `_loss` is a fraction of: the completions' tokens."""
        return batch.completion.sum()

    def _metric(self, name: str, value: Any, weight: Any) -> None:
        """Record a rollout metric (one of `rollout_metrics`), a mean over `weight` items, for the next log of the
        current mode (training, or evaluation: eval mode)."""
        sums = self._metrics["train" if self.model.training else "eval"].setdefault(name, [0.0, 0.0])
        sums[0] += float(value) * float(weight)
        sums[1] += float(weight)

    def prediction_step(self, model: Any, inputs: list[dict[str, Any]], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        """Evaluation on `eval_dataset` rows: their rollouts (sampled as in training, each batch its own draw) and
        their loss, without gradients. The rollouts' reward and other metrics are logged under the evaluation's
        prefix (`eval_reward`, ...) beside `eval_loss`."""
        self._eval_draws += 1
        with torch.no_grad():
            batch = self.rollouts(inputs, draw=self._eval_draws)
            loss, clipped, kl, _ = self._loss(model, batch)
        self._record(batch, clipped, kl)
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> Any:
        """Trainer's loop (`evaluate`, `predict`), its metrics joined by the mean of each rollout metric of the
        evaluation's batches under its prefix (`eval_reward`, ...)."""
        self._metrics["eval"] = {}
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self._taken_means("eval").items()})
        return output

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the mean of each training rollout metric since the last log (reward, KL, invocation rate, ...) to a
        training step's log."""
        if "loss" in logs:
            logs.update(self._taken_means("train"))
        super().log(logs, *args, **kwargs)

    def _taken_means(self, mode: str) -> dict[str, float]:
        """The mean of each rollout metric recorded in `mode` ("train" or "eval") since the last take, over every
        rank's rollouts (a collective: Trainer logs and evaluates on every rank); emptied."""
        recorded, self._metrics[mode] = self._metrics[mode], {}
        unknown = set(recorded) - set(self.rollout_metrics)
        if unknown:
            raise ValueError(f"rollout metrics {sorted(unknown)} are not in {type(self).__name__}.rollout_metrics")
        sums = torch.tensor([recorded.get(name, [0.0, 0.0]) for name in self.rollout_metrics], dtype=torch.float64,
                            device=self.args.device)
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        return {name: total / weight for name, (total, weight) in zip(self.rollout_metrics, sums.tolist())
                if weight > 0}
