"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`, on the CPU (gloo).

`ddp`, `zero2`, `zero3`: weaver SFT, weaver GRPO and trigger RL (both triggers), three SGD steps each, through Hugging Face
`Trainer` under plain DDP or DeepSpeed ZeRO-2 / ZeRO-3. Each rank writes OUT/<stage>.rank<r>.safetensors: the
stage's trained tensors (gathered whole under ZeRO-3), its rollouts' rewards, the rewards it logged, and greedy
completions decoded
after training (under ZeRO-3 through `gathered_for_decoding`, and refused without it); the trainer saves its
checkpoint to OUT/<stage>.saved/ (under ZeRO-3 every rank gathers the trained tensors, rank 0 writes).

`resume`: a ZeRO-3 GRPO run, and the same run resumed from its step-2 checkpoint.
"""

import os
import sys

import torch
from safetensors.torch import save_file
from transformers import TrainingArguments

from memgen.sharding import gathered_for_decoding, parameters_gathered, sharding_of
from memgen.training import sft_trainer
from memgen.training.grpo import GRPOConfig, GRPOTrainer
from memgen.training.trigger_rl import TriggerConfig, TriggerTrainer
from test_grpo import _prompts
from test_modeling import make_batch, make_model
from test_reference_generation import chatty_model
from test_sft import _rows
from worker_exit import end_worker

STAGES = ("sft", "grpo", "trigger", "trigger_head")  # trigger RL with the `lora` and the `head` trigger


def deepspeed_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}


def reward(text: str, target) -> float:
    return float(len(text) % 3 == 0)


def model_for(stage: str):
    """The untrained model of a stage (the trigger stages' reach delimiters, so their trigger decides)."""
    if stage.startswith("trigger"):
        return chatty_model("qwen2", "head" if stage == "trigger_head" else "lora", k_prompt=4, k_inference=2)
    return make_model("qwen2", k_prompt=4, k_inference=2)


def trainer_for(stage: str, model, common: dict):
    if stage == "sft":
        return sft_trainer(model, _rows(16), TrainingArguments(**common))
    if stage == "grpo":
        return GRPOTrainer(model, GRPOConfig(group_size=4, max_new_tokens=6, **common), _prompts(8), reward=reward)
    return TriggerTrainer(model, TriggerConfig(group_size=4, max_new_tokens=8, **common), _prompts(8), reward=reward,
                          allow_untrained_weaver=True)


def greedy(model, wrapped, refused: bool) -> torch.Tensor:
    """The trained model's greedy completions of a batch, decoded through `gathered_for_decoding`; a
    ZeRO-3-partitioned model decoded without it must be refused."""
    input_ids, mask, _ = make_batch(model, [0, 0, 0], "left", seed=3)
    if refused:
        try:
            model.generate(input_ids, mask, max_new_tokens=4)
            raise AssertionError("a partitioned model was decoded")
        except ValueError as err:
            assert "gathered_for_decoding" in str(err), err
    with torch.no_grad(), gathered_for_decoding(wrapped):
        return model.generate(input_ids, mask, max_new_tokens=12)


def arguments(output_dir: str, mode: str, **overrides) -> dict:
    """The TrainingArguments every run shares. SGD: updates proportional to the gradients, so the backends'
    different reduction orders stay at rounding size (Adam's first steps are +-lr for any gradient)."""
    return {**dict(output_dir=output_dir, use_cpu=True, report_to=[], per_device_train_batch_size=2, max_steps=3,
                   optim="sgd", learning_rate=3.0, logging_steps=1, save_strategy="no", disable_tqdm=True,
                   log_level="error", seed=0, dataloader_num_workers=0, ddp_backend="gloo",
                   deepspeed=None if mode == "ddp" else deepspeed_config(int(mode[-1]))), **overrides}


def trained_state(model, stage: str) -> dict[str, torch.Tensor]:
    params = model.stage_parameters("trigger" if stage.startswith("trigger") else "weaver")
    with parameters_gathered(list(params.values())):
        return {k: v.detach().clone().contiguous() for k, v in params.items()}


def stages(mode: str, out: str) -> None:
    for stage in STAGES:
        model = model_for(stage).train()
        trainer = trainer_for(stage, model, arguments(os.path.join(out, stage), mode))
        rewards = []
        if stage != "sft":
            sample = trainer.rollouts

            def recorded(rows):
                batch = sample(rows)
                rewards.append(batch.rewards)
                return batch

            trainer.rollouts = recorded
        trainer.train()
        assert trainer.args.world_size == 2, trainer.args.world_size
        assert (sharding_of(trainer.model_wrapped) == "zero3") == (mode == "zero3")
        trainer.save_model(os.path.join(out, f"{stage}.saved"))
        state = {"rewards": torch.cat(rewards) if rewards else torch.zeros(0),
                 "logged": torch.tensor([h["reward"] for h in trainer.state.log_history if "reward" in h],
                                        dtype=torch.float64),
                 "sequences": greedy(model, trainer.model_wrapped, refused=mode == "zero3"),
                 **trained_state(model, stage)}
        save_file(state, os.path.join(out, f"{stage}.rank{trainer.args.process_index}.safetensors"))


def resume(out: str) -> None:
    """GRPO under ZeRO-3 for 4 steps saving at step 2, then a fresh run resumed from that checkpoint (DeepSpeed
    reads back its own model and optimizer state); each writes OUT/<full|resumed>.rank<r>.safetensors: its
    trained tensors and the rewards it logged."""
    for run, checkpoint in (("full", None), ("resumed", os.path.join(out, "full", "checkpoint-2"))):
        model = model_for("grpo").train()
        trainer = trainer_for("grpo", model, arguments(os.path.join(out, run), "zero3", max_steps=4,
                                                        save_strategy="steps", save_steps=2))
        trainer.train(resume_from_checkpoint=checkpoint)
        rewards = torch.tensor([h["reward"] for h in trainer.state.log_history if "reward" in h])
        save_file({"rewards": rewards, **trained_state(model, "grpo")},
                  os.path.join(out, f"{run}.rank{trainer.args.process_index}.safetensors"))


def main(mode: str, out: str) -> None:
    torch.set_num_threads(1)
    if mode == "resume":
        resume(out)
    else:
        stages(mode, out)
    end_worker()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
