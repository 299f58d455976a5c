"""Where the decoding engine makes the GPU synchronise with the host, per configuration.

The engine's design allows one synchronisation per decode step (it fetches the step's tokens, finished
flags and decisions together, `memgen.transfers.to_host`); every other one stalls the host, which on a
launch-bound GPU is the step's critical path. `tests/test_generation.py` checks the count per step;
this script says where each one comes from, for the decode suite's configurations
(`memgen.bench.decode_suite`): it runs each once to warm up, then once under CUDA's sync debug mode,
and groups the synchronisations by the innermost memgen frames that issued them. The 2026-11-24 H100
session found `head`'s two extra synchronisations per ragged step this way (boolean index assignments
copying their value from pageable host memory).

    python benchmarks/sync_sites.py --preset small --batch 16 [--new-tokens 64] [--impls always head]
"""

from __future__ import annotations

import argparse
import collections
import traceback
import warnings

import torch

from memgen.bench import decode_suite
from memgen.bench.harness import require_positive
from memgen.bench.workload import load_workload

IMPLS = ("memory_off", "always", "prompt_only", "head", "lora")  # the engine's configurations
FRAMES = 3  # memgen frames named per site, innermost first


def _site(stack: list[traceback.FrameSummary]) -> str:
    frames = [f for f in stack if "/memgen/" in f.filename and "/benchmarks/" not in f.filename][::-1][:FRAMES]
    return " <- ".join(f"{f.filename.rsplit('/memgen/', 1)[-1]}:{f.lineno} {f.name}" for f in frames) or "?"


def sync_sites(fn) -> collections.Counter:
    """The synchronisations one call of `fn` makes, counted by the memgen frames that issued them."""
    sites = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            sites[_site(traceback.extract_stack()[:-1])] += 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record  # restored on leaving the block
            fn()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sites


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    args = parser.parse_args(argv)
    require_positive(parser, args, "batch", "new_tokens")
    if torch.device(args.device).type != "cuda" or not torch.cuda.is_available():
        parser.error("--device: a CUDA device is needed (synchronisations are a GPU's)")
    workload = load_workload(args.preset, device=args.device, dtype=torch.bfloat16)
    case, = decode_suite.cases(workload, (args.batch,), args.new_tokens)
    for impl in args.impls:
        case.impls[impl]()  # warm-up: lazy initialisations synchronise once
        sites = sync_sites(case.impls[impl])
        print(f"== {impl}: {sum(sites.values())} synchronisations for {args.new_tokens} new tokens, "
              f"batch {args.batch}")
        for site, n in sites.most_common():
            print(f"  {n:5d}  {site}")


if __name__ == "__main__":
    main()
