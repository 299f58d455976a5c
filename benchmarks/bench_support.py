"""The pytest-benchmark face of memgen's suites (`memgen.bench`): one test per case and implementation.

The workload comes from the environment: MEMGEN_BENCH_PRESET (default `tiny`) or MEMGEN_BENCH_MODEL
(a Hugging Face model path), MEMGEN_BENCH_DEVICE (default: cuda when present). pytest-benchmark
times each implementation's rounds back to back; `memgen bench` interleaves them, which is what
its ratios rely on. `python benchmarks/report.py OUT.json` prints the same tables as `memgen bench`.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from memgen.bench import ROUNDS, suite_cases
from memgen.bench.harness import machine_info, synchronize, warm_up
from memgen.bench.workload import Workload, load_workload

DEVICE = torch.device(os.environ.get("MEMGEN_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))


@functools.cache
def workload() -> Workload:
    model = os.environ.get("MEMGEN_BENCH_MODEL")
    return load_workload(None if model else os.environ.get("MEMGEN_BENCH_PRESET", "tiny"), model, DEVICE,
                         torch.bfloat16 if DEVICE.type == "cuda" else torch.float32)


@functools.cache
def cases(suite: str) -> dict:
    return {case.name: case for case in suite_cases(suite, workload())}


def parameters(suite: str) -> list:
    """(case name, implementation) pairs of a suite, for pytest.mark.parametrize."""
    return [pytest.param(name, impl, id=f"{name}-{impl}") for name, case in cases(suite).items() for impl in case.impls]


def run(benchmark, suite: str, name: str, impl: str) -> None:
    """Warm the implementation up, then let pytest-benchmark time its rounds; the record's fields go to extra_info."""
    case = cases(suite)[name]
    fn = case.impls[impl]
    facts, peak = warm_up(case, impl, DEVICE)
    meta = workload()
    benchmark.extra_info.update(suite=suite, case=name, params=case.params, impl=impl, work=case.work, unit=case.unit,
                                baselines=list(case.baselines), facts=facts, peak_memory_mib=peak,
                                workload=meta.name, device=str(DEVICE), dtype=str(meta.dtype).removeprefix("torch."),
                                machine=machine_info(DEVICE))

    def call():
        fn()
        synchronize(DEVICE)

    benchmark.pedantic(call, rounds=case.max_rounds.get(impl, ROUNDS[suite]), iterations=case.iterations,
                       warmup_rounds=0)
