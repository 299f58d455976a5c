"""`memgen demo`: the method end to end in under a minute on a CPU, offline.

It wraps the `tiny` preset (a 2-layer Qwen2 trained on synthetic punctuated prose) as a frozen reasoner,
measures the answer loss of held-out rows without memory and with the untrained weaver, trains the weaver
with SFT for a few dozen steps, measures again, generates with memory (marking where it was woven),
times decoding with memory against without, and saves the checkpoint for `memgen generate`. The text is
synthetic: this checks the mechanics on the user's machine, it is not a benchmark of the method.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import torch

DEMO_PROMPTS = ("The model reads the plan.", "A user checks two numbers, the weaver adds a clue.",
                "Each step keeps its state.")


def demo_rows(n: int, seed: int) -> list[dict[str, str]]:
    """n prompt/answer rows of the preset's synthetic prose (seeds other than its training text's, 0): a sentence,
    then the next two as the answer."""
    from memgen.presets import synthetic_text

    text = synthetic_text(4 * n, seed)
    sentences = [s.strip() + "." for paragraph in text.split("\n") for s in paragraph.split(".") if s.strip()]
    rows = [{"prompt": sentences[i], "answer": f" {sentences[i + 1]} {sentences[i + 2]}"}
            for i in range(0, len(sentences) - 2, 3)]
    if len(rows) < n:
        raise ValueError(f"the synthetic text gave {len(rows)} rows, fewer than {n}")
    return rows[:n]


def answer_losses(model: Any, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(with memory, without) mean answer cross-entropy of an SFT batch, in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        with_memory = model(**batch).loss.item()
        without = model(**batch, augmentation_points=torch.zeros_like(batch["input_ids"])).loss.item()
    model.train(was_training)
    return with_memory, without


def decode_time(model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, memory: bool,
                rounds: int) -> float:
    """Median seconds of one greedy generate call over `rounds` (after one untimed call)."""
    from memgen.bench.harness import synchronize

    times = []
    for i in range(rounds + 1):
        synchronize(ids.device.type)
        start = time.perf_counter()
        model.generate(ids, mask, max_new_tokens=max_new_tokens, memory=memory)
        synchronize(ids.device.type)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_demo(steps: int, out: str, device: str, max_new_tokens: int, seed: int, rounds: int) -> None:
    """The demo (the module's docstring), printing as it goes."""
    from transformers import PrinterCallback, TrainingArguments, set_seed

    from memgen import MemGenConfig, MemGenModel
    from memgen.cli import MARKER, marked_text
    from memgen.presets import load_preset, tiny_path
    from memgen.training import MemGenCollator, encode_dataset, sft_trainer
    from memgen.training.data import prompt_batch

    set_seed(seed)
    reasoner, tokenizer = load_preset("tiny", device=device)
    model = MemGenModel.from_reasoner(reasoner, tokenizer, MemGenConfig())
    config = model.config
    print(f"memgen demo: the tiny preset as the frozen reasoner (2-layer Qwen2 trained on synthetic prose; "
          f"{tiny_path()}), the weaver a LoRA on it; K = {config.prompt_latents_len} latents at the prompt and "
          f"{config.inference_latents_len} at up to {config.max_inference_aug_num} delimiters ('always' trigger)")
    held_out = demo_rows(32, seed + 2)
    batch = {k: v.to(device) for k, v in MemGenCollator(tokenizer.pad_token_id)(encode_dataset(tokenizer, held_out))
             .items()}
    untrained, without = answer_losses(model, batch)
    print(f"answer loss on {len(held_out)} held-out rows: without memory {without:.3f}, with the untrained weaver "
          f"{untrained:.3f}")
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(scratch, max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3,
                                 lr_scheduler_type="constant", logging_steps=max(1, steps // 6), save_strategy="no",
                                 report_to=[], disable_tqdm=True, log_level="error", seed=seed,
                                 use_cpu=torch.device(device).type == "cpu", dataloader_num_workers=0)
        trainer = sft_trainer(model, demo_rows(8 * steps, seed + 1), args)
        trainer.remove_callback(PrinterCallback)  # the log's dicts: the losses are summed up below
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trained, _ = answer_losses(model, batch)
    print(f"trained the weaver: {steps} SFT steps of 8 rows ({seconds:.1f} s; training loss {logged[0]:.3f} -> "
          f"{logged[-1]:.3f}), the reasoner frozen")
    print(f"answer loss on the held-out rows with the trained weaver: {trained:.3f} (without memory {without:.3f})")
    model.eval()
    ids, mask = (t.to(device) for t in prompt_batch(tokenizer, list(DEMO_PROMPTS)))
    generated = model.generate(ids, mask, max_new_tokens=max_new_tokens, return_dict_in_generate=True)
    print(f"\n=== greedy completions with memory ({MARKER}: latents woven before the next token) ===")
    for row, prompt in enumerate(DEMO_PROMPTS):
        new = generated.sequences[row, ids.shape[1]:][generated.completion_mask[row]].tolist()
        woven = (generated.augmentation_mask[row, :len(new)] == 1).nonzero().flatten().tolist()
        print(f"{prompt} -> {marked_text(tokenizer, new, woven)}")
    on = decode_time(model, ids, mask, max_new_tokens, True, rounds)
    off = decode_time(model, ids, mask, max_new_tokens, False, rounds)
    weaves = int((generated.augmentation_mask == 1).sum()) / len(DEMO_PROMPTS)
    print(f"\ndecoding {len(DEMO_PROMPTS)} prompts x {max_new_tokens} new tokens on {device} (median of {rounds}): "
          f"with memory {on * 1e3:.1f} ms, without {off * 1e3:.1f} ms ({on / off:.2f}x), {weaves:.1f} weaves of "
          f"{config.inference_latents_len} latents a row (dense in so short a completion); `memgen bench` measures "
          "the cost over 256 tokens")
    model.save_pretrained(out)
    print(f"\ncheckpoint: {out}\nnext: memgen generate --memgen {out} --prompt \"The answer keeps a clue.\" "
          "--latent-tokens 3")
