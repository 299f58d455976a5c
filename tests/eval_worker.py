"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: `evaluate` splits its rows across the two
ranks (CPU, gloo), and each rank returns the whole evaluation, equal to one rank decoding every row. Each rank writes
OUT/rank<r>.json: its split result, its whole-batch result, and the prompts it scored itself."""

import json
import os
import sys

import torch
import torch.distributed as dist

from memgen.evaluation import evaluate
from test_reference_generation import chatty_model
from worker_exit import end_worker


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = chatty_model("qwen2", "always")
    rows = [{"prompt": f"Q: {' '.join('abcdefg'[: 1 + i % 5])}, {i}", "target": str(i % 3)} for i in range(7)]
    scored = []

    def reward(text, target):
        scored.append(text)
        return float(target in text) + 0.5 * float(len(text) % 2)

    kwargs = dict(max_new_tokens=8, batch_size=2, return_samples=True)
    split = evaluate(model, rows, reward, **kwargs)
    mine = list(scored)
    whole = evaluate(model, rows, reward, split_across_ranks=False, **kwargs)
    sampled = evaluate(model, rows, reward, do_sample=True, num_return_sequences=2,
                       generator=torch.Generator().manual_seed(dist.get_rank()), **kwargs)
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"split": split, "whole": whole, "mine": len(mine), "sampled": sampled}, f)
    end_worker()


if __name__ == "__main__":
    main(sys.argv[1])
