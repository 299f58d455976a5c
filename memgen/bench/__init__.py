"""memgen's benchmark suites, as `memgen bench` and the `benchmarks/` pytest-benchmark files run them.

- `ops`: each compiled op family on every backend here (`ops_suite`);
- `decode`: generation with memory against vanilla decoding and the reference (`decode_suite`);
- `train`: a weaver SFT step, batched against the row-by-row reference (`train_suite`).

`run(...)` measures the chosen suites on a workload (a preset, or a Hugging Face model) and
returns results that `report.write` turns into results.json, results.md and results.png.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import torch

from memgen.bench import decode_suite, ops_suite, train_suite
from memgen.bench.harness import Case, measure, run_meta
from memgen.bench.report import add_ratios
from memgen.bench.workload import Workload, load_workload

SUITES = ("ops", "decode", "train")
IMPLS = {"ops": ops_suite.IMPLS, "decode": decode_suite.IMPLS, "train": train_suite.IMPLS}
ROUNDS = {"ops": 30, "decode": 9, "train": 5}  # ops calls take microseconds; decode medians need 9 rounds on a noisy VM


def suite_cases(suite: str, workload: Workload, batches: Sequence[int] | None = None,
                new_tokens: int = decode_suite.NEW_TOKENS) -> list[Case]:
    """The cases of one suite on `workload` (its default batch sizes unless `batches` is given)."""
    if suite == "ops":
        return ops_suite.cases(workload, tuple(batches or ops_suite.BATCHES))
    if suite == "decode":
        return decode_suite.cases(workload, tuple(batches or decode_suite.BATCHES), new_tokens)
    if suite == "train":
        return train_suite.cases(workload, tuple(batches or train_suite.BATCHES))
    raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")


def run(suites: Sequence[str] = SUITES, preset: str | None = "tiny", model_path: str | None = None,
        device: str | torch.device = "cpu", dtype: torch.dtype | None = None, rounds: int | None = None,
        batches: Sequence[int] | None = None, new_tokens: int = decode_suite.NEW_TOKENS,
        progress: bool = True, command: str = "", skip: Sequence[str] = ()) -> dict[str, Any]:
    """Measure `suites` on a preset (or `model_path`); returns {"meta": ..., "records": [...]}.

    dtype defaults to float32 on the CPU and bfloat16 on CUDA. `rounds` overrides each suite's
    default; `batches` each suite's batch sizes. `skip` names implementations not to run (e.g. the
    slow `reference` on a large model); ratios over a skipped baseline are then absent. A progress
    bar (stderr) follows every suite.
    """
    from tqdm.auto import tqdm

    for suite in suites:
        if suite not in SUITES:
            raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")
    if rounds is not None and (not isinstance(rounds, int) or rounds < 1):
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if batches is not None and not (batches and all(isinstance(b, int) and b >= 1 for b in batches)):
        raise ValueError(f"batches must be ints >= 1, got {batches!r}")
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens must be an int >= 1, got {new_tokens!r}")
    known = {impl for suite in suites for impl in IMPLS[suite]}
    unknown = [impl for impl in skip if impl not in known]
    if unknown:
        raise ValueError(f"skip: {', '.join(map(repr, unknown))} not among the implementations of the suites run "
                         f"({', '.join(sorted(known))})")
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    workload = load_workload(preset, model_path, device, dtype)
    records: list[dict[str, Any]] = []
    for suite in suites:
        with tqdm(desc=f"{suite}: building", total=None, disable=not progress, file=sys.stderr, leave=False):
            cases = [kept for case in suite_cases(suite, workload, batches, new_tokens)
                     if (kept := without(case, skip)).impls]
        n = rounds or ROUNDS[suite]
        with tqdm(desc=suite, total=n * len(cases), unit="round", disable=not progress, file=sys.stderr) as bar:
            for case in cases:
                bar.set_postfix_str(case.name)
                records += measure(case, n, device, on_round=lambda: bar.update(1))
    add_ratios(records)
    meta = run_meta(workload.name, device, str(dtype).removeprefix("torch."), command or "memgen.bench.run()")
    return {"meta": meta, "records": records}


def without(case: Case, skip: Sequence[str]) -> Case:
    """`case` without the implementations named in `skip` (nor them as baselines)."""
    return dataclasses.replace(case, impls={k: v for k, v in case.impls.items() if k not in skip},
                               baselines=tuple(b for b in case.baselines if b not in skip))


__all__ = ["IMPLS", "SUITES", "Case", "measure", "run", "suite_cases"]
