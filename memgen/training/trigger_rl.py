"""Trigger RL (DESIGN.md section 1, stage 2): the weaver frozen, the trigger (`lora` or `head`) learns when to recall.

Rollouts sample the trigger's decisions (and the tokens) with memgen's engine. Each rollout's
reward is shaped by the paper's reward-adaptive penalty, which the reference code leaves out. In
each group, H_high is the set of rollouts whose reward is at least the group's median. p_bar is
their mean invocation rate (INVOKE decisions / decision points). Every rollout's shaped reward is
`R - lambda * (its INVOKE decisions) * (1 - p_bar)`. Group-normalised advantages of the shaped
rewards then weigh PPO's clipped objective on the log-probabilities of the decisions taken. Those
come from the trigger's logits as generation computed them (`MemGenModel.forward(..., trigger_logits=True)`:
the `lora` trigger over the same token ids, the `head` trigger on the reasoner's hidden states in the stream
the rollout wove) at the sampling temperature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from memgen.training.grpo import GRPOConfig, GRPOTrainer, check_number, clipped_loss


@dataclass
class TriggerConfig(GRPOConfig):
    """`GRPOConfig` for the trigger stage, plus the penalty's weight `invoke_penalty` (lambda)."""

    invoke_penalty: float = field(default=0.1, metadata={"help": "lambda of the reward-adaptive penalty"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("invoke_penalty", self.invoke_penalty, lambda v: v >= 0, ">= 0")
        if self.beta != 0:
            raise ValueError("beta (a KL to the initial weaver) belongs to the weaver stage; trigger RL takes beta=0")


def adaptive_penalty(rewards: torch.Tensor, decisions: torch.Tensor, group_size: int,
                     penalty: float) -> torch.Tensor:
    """Shaped rewards [N * G]: R - lambda * invocations * (1 - p_bar), p_bar per group (see the module docstring).

    rewards: [N * G]; decisions: [N * G, T] with -100 where no decision was taken, 0 SKIP, 1 INVOKE.
    """
    invocations = (decisions == 1).sum(1).float()
    points = (decisions >= 0).sum(1).float()
    rate = (invocations / points.clamp(min=1)).view(-1, group_size)
    grouped = rewards.view(-1, group_size)
    high = grouped >= torch.quantile(grouped, 0.5, dim=1, keepdim=True)
    p_bar = (rate * high).sum(1, keepdim=True) / high.sum(1, keepdim=True)
    return (grouped - penalty * invocations.view(-1, group_size) * (1 - p_bar)).flatten()


class TriggerTrainer(GRPOTrainer):
    """Trigger RL through Hugging Face `Trainer`: only the trigger's parameters train.

    Refuses a model whose weaver was neither trained (a weaver stage ran) nor loaded from a checkpoint,
    unless `allow_untrained_weaver=True`: a trigger trained against a random weaver learns nothing useful.
    """

    stage_name = "trigger"

    def __init__(self, model: Any, args: TriggerConfig, train_dataset: Any, reward: Callable[[str, Any], float],
                 allow_untrained_weaver: bool = False, **kwargs: Any) -> None:
        if not isinstance(args, TriggerConfig):
            raise ValueError(f"args must be a TriggerConfig, got {type(args).__name__}")
        if model.trigger is None:
            raise ValueError("trigger RL trains a `lora` or `head` trigger: build the model with "
                             "MemGenConfig(trigger_mode='lora') or trigger_mode='head'")
        if not model.weaver_trained and not allow_untrained_weaver:
            raise ValueError("the weaver was neither trained nor loaded from a checkpoint: train it first (SFT or "
                             "GRPO), load one with MemGenModel.from_pretrained, or pass allow_untrained_weaver=True")
        super().__init__(model, args, train_dataset, reward, **kwargs)

    def generation_kwargs(self) -> dict[str, Any]:
        return {"trigger_mode": self.accelerator.unwrap_model(self.model).trigger.mode}

    def scores(self, rewards: torch.Tensor, decisions: torch.Tensor) -> torch.Tensor:
        return adaptive_penalty(rewards, decisions, self.args.group_size, self.args.invoke_penalty)

    rollout_metrics = (*GRPOTrainer.rollout_metrics, "shaped_reward")

    def _record(self, batch, clipped, kl) -> None:
        super()._record(batch, clipped, kl)
        self._metric("shaped_reward", batch.scores.mean(), len(batch.scores))

    def _clipped_over(self, batch) -> torch.Tensor:
        """The decisions (`_loss` scores the decision before token j at position j - 1)."""
        return (batch.decided[:, 1:] >= 0).sum()

    def _loss(self, model, batch):
        """The clipped objective on the log-probabilities of the decisions the rollouts took."""
        logits = model(batch.input_ids, batch.attention_mask, batch.labels, augmentation_points=batch.points,
                       trigger_logits=True).trigger_logits
        taken = torch.full_like(batch.decided, -100)
        taken[:, :-1] = batch.decided[:, 1:]  # the decision before token j was read at position j - 1
        mask = taken >= 0
        logps = torch.log_softmax(logits.float() / self.args.temperature, -1).gather(-1, taken.clamp(min=0)[..., None])
        logps = logps.squeeze(-1)
        loss, clipped = clipped_loss(logps, logps.detach(), batch.advantages, mask, self.args.epsilon,
                                     self.args.loss_type, self.args.max_new_tokens)
        return loss, clipped, None, logits
