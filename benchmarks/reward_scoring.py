"""What scoring a step's completions in threads (`GRPOConfig.reward_workers`, `evaluate(reward_workers=)`,
`memgen eval --reward-workers`) saves with the code task's reward, whose every call runs the completion's
tests in a sandboxed process of its own.

The completions are a GRPO step's worth of KodCode-style answers to one function: most pass, some
fail a test, some crash on import and some loop until the sandbox's timeout kills them, which an
untrained model's rollouts do. Each implementation scores them all with `reward_workers` threads;
1 is the sequential baseline. The harness of `memgen bench` times them side by side:

    python benchmarks/reward_scoring.py --completions 32 --hanging 2 --timeout 2 --workers 2 4 8 --out DIR
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from memgen.bench.harness import Case, measure, require_positive, run_meta
from memgen.bench.report import add_ratios, markdown, write
from memgen.tasks.rewards import code_reward
from memgen.training.grpo import scored_all

TESTS = """from solution import clamp


def test_inside():
    assert clamp(5, 0, 10) == 5


def test_below():
    assert clamp(-3, 0, 10) == 0


def test_above():
    assert clamp(12, 0, 10) == 10
"""

ANSWERS = {  # kind -> a completion's text
    "passes": "```python\ndef clamp(x, low, high):\n    return max(low, min(x, high))\n```",
    "fails a test": "```python\ndef clamp(x, low, high):\n    return min(x, high)\n```",
    "crashes on import": "```python\ndef clamp(x, low, high)\n    return x\n```",
    "hangs": "```python\nwhile True:\n    pass\n```",
}


def completions(n: int, hanging: int) -> list[str]:
    """`n` completions, `hanging` of them loops, the rest passing, failing and crashing in turn (3:1:1)."""
    others = ["passes", "passes", "passes", "fails a test", "crashes on import"]
    kinds = ["hangs"] * hanging + [others[i % len(others)] for i in range(n - hanging)]
    return [ANSWERS[kind] for kind in kinds]


def case(n: int, hanging: int, timeout: float, workers: list[int]) -> Case:
    texts = completions(n, hanging)
    reward = functools.partial(_reward, timeout=timeout)
    impls = {f"{w} worker{'s' if w > 1 else ''}": functools.partial(scored_all, reward, texts, [TESTS] * n, w)
             for w in sorted({1, *workers})}
    return Case("rewards", f"N{n}-H{hanging}", dict(completions=n, hanging=hanging, timeout_s=timeout), impls,
                baselines=("1 worker",), work=n, unit="rows",
                describe=lambda impl, scores: {"mean reward": sum(scores) / len(scores)})


def _reward(text: str, tests: str, timeout: float) -> float:
    return code_reward(text, tests, timeout=timeout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--completions", type=int, default=32, help="completions scored per call (a GRPO step's)")
    parser.add_argument("--hanging", type=int, default=2, help="of which loop until the sandbox's timeout")
    parser.add_argument("--timeout", type=float, default=2.0, help="the sandbox's wall-clock limit per completion (s)")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8], help="reward_workers to time beside 1")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", help="write results.json, results.md and results.png here")
    args = parser.parse_args(argv)
    require_positive(parser, args, "completions", "rounds")
    if not 0 <= args.hanging <= args.completions:
        parser.error(f"--hanging must be in 0 .. --completions ({args.completions}), got {args.hanging}")
    if not args.timeout > 0 or min(args.workers) < 1:
        parser.error("--timeout must be > 0 and every --workers >= 1")
    records = measure(case(args.completions, args.hanging, args.timeout, args.workers), args.rounds, "cpu")
    add_ratios(records)
    command = "python benchmarks/reward_scoring.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = run_meta("kodcode-style completions", "cpu", "-", command)
    meta["machine"]["cpus"] = os.cpu_count()
    results = {"records": records, "meta": meta}
    print(markdown(results))
    if args.out:
        write(results, args.out)


if __name__ == "__main__":
    main()
