"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: a few steps of weaver SFT or GRPO
on the CPU (gloo); each rank writes its trained tensors to OUT/rank<r>.safetensors."""

import os
import sys

import datasets
import torch
from safetensors.torch import save_file
from transformers import TrainingArguments

from memgen.training import sft_trainer
from memgen.training.grpo import GRPOConfig, GRPOTrainer
from test_grpo import _prompts
from test_modeling import make_model
from test_sft import _rows
from worker_exit import end_worker


def main(stage: str, out: str) -> None:
    torch.set_num_threads(1)
    model = make_model("qwen2", k_prompt=4, k_inference=2).train()
    common = dict(output_dir=out, use_cpu=True, report_to=[], per_device_train_batch_size=2, max_steps=3,
                  learning_rate=3e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, log_level="error",
                  seed=0, dataloader_num_workers=0, ddp_backend="gloo")
    stage, _, streamed = stage.partition("-")  # "-streamed": rows from a datasets.IterableDataset
    rows = _rows(16) if stage == "sft" else _prompts(8)
    if streamed:
        rows = datasets.Dataset.from_list(rows).to_iterable_dataset()
    if stage == "sft":
        trainer = sft_trainer(model, rows, TrainingArguments(**common))
    else:
        trainer = GRPOTrainer(model, GRPOConfig(group_size=4, max_new_tokens=6, **common), rows,
                              reward=lambda text, target: float(len(text) % 3 == 0))
    trainer.train()
    assert trainer.args.world_size == 2, trainer.args.world_size
    state = {k: v.detach().contiguous() for k, v in model.stage_parameters("weaver").items()}
    save_file(state, os.path.join(out, f"rank{trainer.args.process_index}.safetensors"))
    end_worker()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
