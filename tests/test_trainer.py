"""Weaver SFT through Hugging Face Trainer: the loss goes down, the reasoner does not move."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import Trainer, TrainingArguments

from memgen.training import MemGenCollator, MemGenTrainer
from test_modeling import make_model


def sft_rows(model, n_rows=32, seed=0):
    """Prompts of random words; the answer repeats a fixed punctuated phrase (learnable by the weaver)."""
    tok = model.tokenizer
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "green", "seven", "north", "light"]
    answer = tok.encode(" First, the plan. Then, the answer.\n Done.")
    rows = []
    for _ in range(n_rows):
        prompt = tok.encode("Q: " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) + "?")
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return rows


def test_trainer_sft_lowers_the_loss_and_leaves_the_reasoner_alone(tmp_path):
    model = make_model("qwen2", k_prompt=4, k_inference=2)
    model.train()
    base_before = {k: v.clone() for k, v in model.reasoner.state_dict().items() if "lora_" not in k}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=40,
                             learning_rate=3e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
                             remove_unused_columns=False, disable_tqdm=True, log_level="error")
    trainer = Trainer(model=model, args=args, train_dataset=sft_rows(model),
                      data_collator=MemGenCollator(model.tokenizer.pad_token_id))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 40
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    # a random tiny reasoner moves slowly: measured 5.95 -> 5.69 over 40 steps at lr 3e-2
    assert last < first - 0.1, losses
    for key, value in model.reasoner.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, base_before[key]), key


def test_the_trigger_stage_needs_a_loss_that_involves_the_trigger(tmp_path):
    """The teacher-forced loss does not involve the trigger: a trigger stage on it ran with a zero gradient norm and
    trained nothing, silently."""
    model = make_model(trigger_mode="lora")
    with pytest.raises(ValueError, match="stage='trigger' with the teacher-forced loss would train nothing"):
        MemGenTrainer(model, TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]), stage="trigger",
                      train_dataset=sft_rows(model, 4), data_collator=MemGenCollator(model.tokenizer.pad_token_id))
