"""Accuracy of a MemGen model on a task, with memory and without (the same engine, `memory=False`).

Each row's prompt is decoded (through the chat template when the tokenizer has one), greedily or
as several samples, and the task's reward scores each completion (up to its first EOS). The mean
reward is the accuracy (for code, the mean fraction of unit tests passed); pass@k counts the
completions with full marks, Chen et al. (2021)'s unbiased estimate from n samples per row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from memgen.sharding import distributed, sharding_of
from memgen.training.data import check_prompt_rows, prompt_batch, template_kwargs
from memgen.training.grpo import check_count, completions, scored_all


def pass_at_k(n: int, passed: int, k: int) -> float:
    """The chance that at least one of k samples drawn without replacement from n, of which `passed` pass, passes:
    1 - C(n - passed, k) / C(n, k), the unbiased estimate of pass@k from n >= k samples (Chen et al., 2021)."""
    if not 1 <= k <= n or not 0 <= passed <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n and 0 <= passed <= n, got n={n}, passed={passed}, k={k}")
    return 1.0 - math.comb(n - passed, k) / math.comb(n, k)


def reported_ks(n: int) -> list[int]:
    """The k of pass@k reported for n samples per row: 1, the powers of two below n, and n."""
    return sorted({1, n, *(2 ** i for i in range(1, n.bit_length()) if 2 ** i < n)})


def paired_difference(first: Sequence[float], second: Sequence[float], resamples: int = 10_000,
                      seed: int = 0) -> dict[str, float]:
    """{"mean", "low", "high"}: the mean of first - second over paired rows (each row's reward in two settings,
    e.g. with memory and without) and its 95% percentile interval from `resamples` bootstrap resamples of the
    rows (seeded: the same rows give the same interval)."""
    if len(first) != len(second) or not first:
        raise ValueError(f"paired_difference needs two equally long, non-empty lists, got {len(first)} and "
                         f"{len(second)}")
    check_count("resamples", resamples)
    differences = torch.tensor(first, dtype=torch.float64) - torch.tensor(second, dtype=torch.float64)
    draws = torch.randint(len(differences), (resamples, len(differences)),
                          generator=torch.Generator().manual_seed(seed))
    means = differences[draws].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"mean": float(differences.mean()), "low": low, "high": high}


def _shares(model: Any, split_across_ranks: bool | None) -> tuple[int, int]:
    """(this rank, ranks sharing the rows): (0, 1) unless `evaluate` splits its rows across the ranks."""
    if split_across_ranks is not None and not isinstance(split_across_ranks, bool):
        raise ValueError(f"split_across_ranks must be a bool or None, got {split_across_ranks!r}")
    sharded = sharding_of(model) is not None
    if split_across_ranks and not distributed():
        raise ValueError("split_across_ranks=True needs an initialised torch.distributed process group of more than "
                         "one rank")
    if split_across_ranks and sharded:
        raise ValueError("split_across_ranks=True: this model is sharded (FSDP or ZeRO-3), and its ranks must make "
                         "the same decoding calls, so each decodes every row")
    split = distributed() and not sharded if split_across_ranks is None else split_across_ranks
    return (dist.get_rank(), dist.get_world_size()) if split else (0, 1)


@torch.no_grad()
def evaluate(model: Any, rows: Sequence[dict[str, Any]], reward: Callable[[str, Any], float], memory: bool = True,
             max_new_tokens: int = 512, batch_size: int = 8, trigger_mode: str | None = None,
             eos_token_id: int | list[int] | None = None, reward_workers: int = 1,
             return_samples: bool = False, do_sample: bool = False, num_return_sequences: int = 1,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, generator: torch.Generator | None = None,
             stop_strings: str | list[str] | None = None, chat_template_kwargs: dict[str, Any] | None = None,
             split_across_ranks: bool | None = None) -> dict[str, Any]:
    """{"accuracy": mean reward, "pass@k": ... for each reported k, "rows": n, "insertions_per_response": mean INVOKE
    count} over `rows` (each with `prompt` and `target`, e.g. from `memgen.tasks.load_task`); `trigger_mode`
    overrides the model's for this evaluation. A completion passes when its reward is at least 1 (full marks: every
    unit test, an exact match); pass@k is reported for k = 1, the powers of two below `num_return_sequences`, and
    `num_return_sequences` itself (pass@1 alone when greedy, where it differs from the accuracy only for rewards
    that give partial credit, as the code tasks do).

    `do_sample`, `temperature`, `top_k`, `top_p`, `min_p`, `generator`: as `MemGenModel.generate` takes them (greedy by
    default); `num_return_sequences` samples per row (> 1 needs do_sample), all of them scored and counted in the
    accuracy and the insertions. With a `generator` the draws depend on `batch_size` (rows decoded per call, each
    with its samples), since each call draws its own. `eos_token_id`: the id(s) that end a completion (default: the
    tokenizer's EOS); a chat model whose turns end with another token (its `generation_config` lists it) needs it,
    or its completions run on past the turn, and a final answer taken from the end of the text is then taken from
    what it wrote after. `stop_strings`: a completion also ends once its text ends with one of these (as
    `generate` takes them; a base model's run-on "Question:"), which it keeps. `reward_workers`: threads scoring a
    batch's completions at once (for rewards that wait on a process, as the code tasks' sandbox does; above 1 only
    for a reward that is safe to call from threads).
    `chat_template_kwargs`: extra variables for the chat template that renders the prompts (Qwen3's
    `{"enable_thinking": False}`; `memgen.training.data.template_kwargs`).
    `return_samples`: also "samples", one {"prompt", "sample", "completion", "target", "reward", "insertions"} per
    completion (each row's samples in turn; "sample" numbers them from 0), to read what the model wrote where it
    scored.

    `split_across_ranks`: under `torchrun` (a default process group of several ranks), each rank decodes and
    scores every world-size-th row and the results are gathered, so that every rank returns the whole evaluation
    (the same dict); None (default) splits exactly then, unless the model is sharded (FSDP, ZeRO-3), whose ranks
    must decode together. Sampled rows then draw from each rank's own `generator`: seed it by rank (as `memgen eval`
    does), or rows on different ranks draw alike."""
    check_count("batch_size", batch_size)
    check_count("reward_workers", reward_workers)
    check_count("num_return_sequences", num_return_sequences)
    if num_return_sequences > 1 and not do_sample:
        raise ValueError(f"num_return_sequences={num_return_sequences} needs do_sample=True: greedy decoding returns "
                         "the same completion for every copy of a prompt")
    rows = list(rows)
    if not rows:
        raise ValueError("rows must not be empty")
    check_prompt_rows(rows, "evaluate")
    tok, device, n = model.tokenizer, model.device, num_return_sequences
    template_kwargs(tok, chat_template_kwargs)
    eos = tok.eos_token_id if eos_token_id is None else eos_token_id  # checked by `generate`, before any work
    rank, world = _shares(model, split_across_ranks)
    mine = list(range(rank, len(rows), world))  # the rows this rank decodes, in order
    scores, insertions, texts = [], [], []
    for start in range(0, len(mine), batch_size):
        chunk = [rows[i] for i in mine[start:start + batch_size]]
        ids, mask = prompt_batch(tok, [r["prompt"] for r in chunk], chat_template_kwargs)
        out = model.generate(ids.to(device), mask.to(device), max_new_tokens=max_new_tokens, memory=memory,
                             eos_token_id=eos, trigger_mode=trigger_mode, return_dict_in_generate=True,
                             do_sample=do_sample, num_return_sequences=n, temperature=temperature, top_k=top_k,
                             top_p=top_p, min_p=min_p, generator=generator, stop_strings=stop_strings)
        _, keep, chunk_texts = completions(tok, out, ids.shape[1])
        woven = out.augmentation_mask.cpu() == 1
        targets = [row["target"] for row in chunk for _ in range(n)]
        scores += scored_all(reward, chunk_texts, targets, reward_workers)
        insertions += [int(woven[b][keep[b]].sum()) for b in range(len(chunk_texts))]
        texts += chunk_texts
    if world > 1:  # every rank's rows, back in order: each row's n completions in turn
        shares = [None] * world
        dist.all_gather_object(shares, (mine, scores, insertions, texts))
        per_row = {i: [values[j * n:(j + 1) * n] for values in share[1:]]
                   for share in shares for j, i in enumerate(share[0])}
        scores, insertions, texts = ([value for i in range(len(rows)) for value in per_row[i][field]]
                                     for field in range(3))
    passed = [sum(score >= 1 for score in scores[i:i + n]) for i in range(0, len(scores), n)]
    result: dict[str, Any] = {"accuracy": sum(scores) / len(scores),
                              **{f"pass@{k}": sum(pass_at_k(n, c, k) for c in passed) / len(passed)
                                 for k in reported_ks(n)},
                              "rows": len(rows), "insertions_per_response": sum(insertions) / len(insertions)}
    if return_samples:
        result["samples"] = [{"prompt": rows[i // n]["prompt"], "sample": i % n, "completion": text,
                              "target": rows[i // n]["target"], "reward": score, "insertions": woven_count}
                             for i, (text, score, woven_count) in enumerate(zip(texts, scores, insertions))]
    return result
