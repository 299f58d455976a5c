"""Timing harness of `memgen bench`: the implementations of a case measured side by side.

A `Case` is one configuration (an op at a batch size, a decode setting, a training step) with
several implementations of the same work. `measure` times them in interleaved rounds: every round
runs each implementation once, in an order that rotates from round to round, so a machine whose
speed drifts over minutes (a shared VM) slows every implementation alike and ratios of medians stay
meaningful. Peak memory is read per implementation during its warm-up run: on CUDA the peak
allocated by torch, on the CPU the process's peak resident set (Linux resets it on request).
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from memgen.peak_memory import peak_memory_mib, reset_peak_memory


@dataclass
class Case:
    """Implementations of one piece of work, measured side by side.

    suite: "ops", "decode" or "train". name: unique within the suite (e.g. "decode-B16").
    params: what the case measures (batch size, op, mode, ...): the rows of the report.
    impls: implementation name -> a call that does the work once (its result feeds `describe`).
    baselines: implementations the others are compared with (ratio = time / baseline's time).
    work, unit: how much work one call does (tokens, rows, steps), for the derived rate.
    describe: (impl, result of its warm-up call) -> facts to report (e.g. insertions per row).
    iterations: calls per timed round (microsecond-scale ops need several to read a clock).
    warmup: untimed calls before the rounds (library loading, allocator, kernel compilation).
    max_rounds: implementation -> a cap on its rounds (a slow reference measured less often; its
        rounds still alternate with everyone else's).
    """

    suite: str
    name: str
    params: dict[str, Any]
    impls: dict[str, Callable[[], Any]]
    baselines: tuple[str, ...] = ()
    work: float = 1.0
    unit: str = "calls"
    describe: Callable[[str, Any], dict[str, Any]] | None = None
    iterations: int = 1
    warmup: int = 1
    max_rounds: dict[str, int] = field(default_factory=dict)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that a clock read after it includes that work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], iterations: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iterations


def measure(case: Case, rounds: int, device: torch.device | str,
            on_round: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Time every implementation of `case` over `rounds` interleaved rounds; one record per implementation.

    A record holds the case's suite, name and params, the implementation, each round's seconds per
    call, their median and interquartile range, the derived rate (`work / median` per second),
    the peak memory (MiB) and what `describe` reported. `on_round` is called after each round.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    device = torch.device(device)
    names = list(case.impls)
    warm = {name: warm_up(case, name, device) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            if len(times[name]) < case.max_rounds.get(name, rounds):
                times[name].append(_timed(case.impls[name], case.iterations, device))
        if on_round is not None:
            on_round()
    records = []
    for name in names:
        median = statistics.median(times[name])
        quartiles = statistics.quantiles(times[name], n=4) if len(times[name]) > 1 else [median] * 3
        records.append(record(case, name, median, quartiles[2] - quartiles[0], times[name], *warm[name]))
    return records


def warm_up(case: Case, impl: str, device: torch.device | str) -> tuple[dict[str, Any], float | None]:
    """Run `impl`'s untimed calls; returns what `describe` says of the last one and the peak memory (MiB)."""
    device = torch.device(device)
    reset_peak_memory(device)
    result = None
    for _ in range(max(case.warmup, 1)):
        result = case.impls[impl]()
    synchronize(device)
    facts = case.describe(impl, result) if case.describe is not None else {}
    return facts, peak_memory_mib(device)


def record(case: Case, impl: str, median: float, iqr: float, times: list[float], facts: dict[str, Any],
           peak_mib: float | None) -> dict[str, Any]:
    """One implementation's result (plain data, as results.json stores it)."""
    return dict(suite=case.suite, case=case.name, params=dict(case.params), impl=impl, rounds=len(times),
                times_s=times, median_s=median, iqr_s=iqr, iterations=case.iterations, work=case.work,
                unit=case.unit, rate_per_s=case.work / median, peak_memory_mib=peak_mib, facts=facts,
                baselines=list(case.baselines))


def machine_info(device: torch.device | str) -> dict[str, Any]:
    """The machine a run was measured on: CPU model and cores, GPU name, library versions."""
    import transformers

    import memgen

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.device(device)
    info = dict(cpu=cpu, cores=torch.get_num_threads(), platform=platform.platform(), python=platform.python_version(),
                torch=torch.__version__, transformers=transformers.__version__, memgen=memgen.__version__,
                device=str(device), ops_native=memgen.ops.backend().native_loaded)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_meta(workload: str, device: torch.device | str, dtype: str, command: str) -> dict[str, Any]:
    """The `meta` of a run's results: what ran, where, when and how to run it again."""
    return dict(workload=workload, device=str(device), dtype=dtype, machine=machine_info(device),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), command=command)


def require_positive(parser, args, *names: str) -> None:
    """A benchmark script's check of its integer options `names` (argparse dests): each >= 1, else the parser exits
    with an error naming the option."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
