"""Accuracy of a MemGen model on a task, with memory and without (the same engine, `memory=False`).

Greedy decoding of each row's prompt (through the chat template when the tokenizer has one), the
task's reward on each completion (up to its first EOS), averaged: for exact-match tasks that is
the accuracy; for code, the mean fraction of unit tests passed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from memgen.modeling import eos_id_list
from memgen.training.data import check_prompt_rows, prompt_batch
from memgen.training.grpo import check_count, completions, scored_all


@torch.no_grad()
def evaluate(model: Any, rows: Sequence[dict[str, Any]], reward: Callable[[str, Any], float], memory: bool = True,
             max_new_tokens: int = 512, batch_size: int = 8, trigger_mode: str | None = None,
             eos_token_id: int | list[int] | None = None, reward_workers: int = 1,
             return_samples: bool = False) -> dict[str, Any]:
    """{"accuracy": mean reward, "rows": n, "insertions_per_response": mean INVOKE count} over `rows`
    (each with `prompt` and `target`, e.g. from `memgen.tasks.load_task`); `trigger_mode` overrides the
    model's for this evaluation. `eos_token_id`: the id(s) that end a completion (default: the tokenizer's EOS);
    a chat model whose turns end with another token (its `generation_config` lists it) needs it, or its
    completions run on past the turn, and a final answer taken from the end of the text is then taken from what
    it wrote after. `reward_workers`: threads scoring a batch's completions at once (for rewards that wait on a
    process, as the code tasks' sandbox does; above 1 only for a reward that is safe to call from threads).
    `return_samples`: also "samples", one {"prompt", "completion", "target", "reward", "insertions"} per row in
    order, to read what the model wrote where it scored."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    check_count("reward_workers", reward_workers)
    rows = list(rows)
    if not rows:
        raise ValueError("rows must not be empty")
    check_prompt_rows(rows, "evaluate")
    tok, device = model.tokenizer, model.device
    eos = tok.eos_token_id if eos_token_id is None else eos_token_id  # checked by `generate`, before any work
    scores, insertions, texts = [], [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, mask = prompt_batch(tok, [r["prompt"] for r in chunk])
        out = model.generate(ids.to(device), mask.to(device), max_new_tokens=max_new_tokens, memory=memory,
                             eos_token_id=eos, trigger_mode=trigger_mode, return_dict_in_generate=True)
        _, keep, chunk_texts = completions(tok, out.sequences, ids.shape[1], eos_id_list(eos))
        woven = out.augmentation_mask.cpu() == 1
        scores += scored_all(reward, chunk_texts, [row["target"] for row in chunk], reward_workers)
        insertions += [int(woven[b][keep[b]].sum()) for b in range(len(chunk))]
        texts += chunk_texts
    result: dict[str, Any] = {"accuracy": sum(scores) / len(scores), "rows": len(scores),
                              "insertions_per_response": sum(insertions) / len(insertions)}
    if return_samples:
        result["samples"] = [{"prompt": row["prompt"], "completion": text, "target": row["target"], "reward": score,
                              "insertions": n} for row, text, score, n in zip(rows, texts, scores, insertions)]
    return result
