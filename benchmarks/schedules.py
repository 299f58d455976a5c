"""What the engine's run-ahead schedule saves, per trigger mode, against rows kept in step.

Kept in step (as the engine runs with a streamer or synced ranks), every weaving step makes a weaver
call, and with `head` and `lora` (a row decides after the reasoner has read its token) also a
reasoner call for the invoking rows' latents alone. By default rows run ahead of each other instead
(`memgen.generation`): a row that weaves reads its latents in a later step's call, beside the other
rows' tokens, and falls behind; where `JOINT_WEAVER_MODES` says so (`always` and `head` on a CPU) the weaver's
items go in the reasoner's calls too, so the weaver makes no call of its own after the prompt's.
Both schedules draw the same samples (one uniform per row and column), so their outputs are
identical and only the calls differ. This script times them side by side, with memory off as the
baseline, in interleaved rounds:

    python benchmarks/schedules.py --preset small --batch 16 --rounds 9 [--modes always head lora]
        [--other-weaver] [--device cuda] --out DIR

`--other-weaver` also times each mode running ahead with its weaver placed the other way than the
device's default (in the reasoner's calls, or in calls of its own), to check that default. `--copies`
also times each mode running ahead with the calls of one item per batch row giving each item a copy
of its row's cache, instead of attending to each row's cache in place (`BY_ROW_ATTENTION`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from unittest import mock

import torch

from memgen import generation
from memgen.bench.decode_suite import weaver_calls
from memgen.bench.harness import Case, measure, require_positive, run_meta
from memgen.bench.report import add_ratios, markdown, paired_cell, write
from memgen.bench.workload import load_workload, prompt_batch

MODES = ("always", "head", "lora")
OTHER = {True: "weaver in the reasoner's calls", False: "weaver's own calls"}  # placements, named in reports
COPIES = "a cache copy per item"  # the variant without in-place attention, named in reports


class _InStep:
    """A streamer that keeps nothing: passing one keeps the rows in step."""

    def put(self, value: torch.Tensor) -> None:
        pass

    def end(self) -> None:
        pass


def _weaver_placement(device_type: str, mode: str, joint: bool) -> contextlib.AbstractContextManager:
    """Runs the enclosed calls with `mode`'s weaver reading in the reasoner's calls (joint) or in its own."""
    others = tuple(m for m in generation.JOINT_WEAVER_MODES.get(device_type, ()) if m != mode)
    return mock.patch.dict(generation.JOINT_WEAVER_MODES, {device_type: others + ((mode,) if joint else ())})


def cases(preset: str, device: str, dtype: torch.dtype, batch: int, new_tokens: int,
          modes: tuple[str, ...] = MODES, other_weaver: bool = False, copies: bool = False) -> Case:
    """Memory off, then each trigger mode in step and running ahead, on the decode suite's workload; with
    other_weaver, also running ahead with the weaver placed the other way than the device's default; with copies,
    also running ahead with a cache copy per item instead of in-place attention."""
    workload = load_workload(preset, device=device, dtype=dtype)
    device_type = torch.device(device).type
    input_ids, mask = prompt_batch(workload, batch)
    models = {mode: workload.memgen_model(mode) for mode in modes}

    def generate(model, **kwargs):
        generator = torch.Generator(device=device).manual_seed(0)
        return model.generate(input_ids, mask, max_new_tokens=new_tokens, do_sample=True, generator=generator,
                              eos_token_id=workload.tokenizer.eos_token_id, return_dict_in_generate=True, **kwargs)

    impls = {"memory off": lambda: generate(models[modes[0]], memory=False)}
    for mode in modes:
        impls[f"{mode} in step"] = lambda mode=mode: generate(models[mode], trigger_mode=mode, streamer=_InStep())
        impls[f"{mode} run ahead"] = lambda mode=mode: generate(models[mode], trigger_mode=mode)
        if other_weaver:
            joint = not generation.weaves_in_reasoner_calls(mode, device_type, batch)

            def flipped(mode=mode, joint=joint):
                with _weaver_placement(device_type, mode, joint):
                    return generate(models[mode], trigger_mode=mode)

            impls[f"{mode} run ahead, {OTHER[joint]}"] = flipped
        if copies:
            def copying(mode=mode):
                # without in-place attention: each item's batch row gets a copy of its row's cache
                with mock.patch.object(generation, "BY_ROW_ATTENTION", ()):
                    return generate(models[mode], trigger_mode=mode)

            impls[f"{mode} run ahead, {COPIES}"] = copying

    def describe(impl: str, result) -> dict:
        mode, schedule = (impl.split(" ", 1) + [""])[:2]
        if mode not in modes:
            return {}
        joint = next((flag for flag, name in OTHER.items() if schedule.endswith(name)), None)  # None: the default
        calls = weaver_calls(result.augmentation_mask, mode, device_type, in_step=schedule == "in step", joint=joint)
        return {"weaver_calls": calls,
                "insertions_per_row": float((result.augmentation_mask == 1).sum(1).float().mean())}

    return Case("decode", f"schedules-B{batch}", dict(batch=batch, new_tokens=new_tokens), impls,
                baselines=("memory off", *(f"{mode} in step" for mode in modes),
                           *((f"{mode} run ahead" for mode in modes) if other_weaver or copies else ())),
                work=batch * new_tokens,
                unit="tokens", describe=describe)


def comparison(records: list[dict]) -> str:
    """A Markdown section: per mode, its run-ahead time over its in-step time, and each variant's (the other weaver
    placement, cache copies) over the default's when timed, paired per round (95% CI)."""
    by_impl = {r["impl"]: r for r in records}
    timed = [mode for mode in MODES if f"{mode} in step" in by_impl]
    variants = {mode: [impl for impl in by_impl if impl.startswith(f"{mode} run ahead, ")] for mode in timed}
    lines = ["## Run ahead over in step", ""]
    if any(variants.values()):
        lines += ["| mode | weaver calls (in step, run ahead, variants) | run ahead / in step | "
                  "variant / run ahead |", "|---|---|---|---|"]
    else:
        lines += ["| mode | weaver calls (in step, run ahead) | paired ratio (95% CI) |", "|---|---|---|"]
    for mode in timed:
        in_step, run_ahead = by_impl[f"{mode} in step"], by_impl[f"{mode} run ahead"]
        calls = [in_step["facts"]["weaver_calls"], run_ahead["facts"]["weaver_calls"]]
        cells = [paired_cell(run_ahead["paired_ratios"][f"{mode} in step"])]
        if variants[mode]:
            calls += [by_impl[impl]["facts"]["weaver_calls"] for impl in variants[mode]]
            cells.append("; ".join(f"{paired_cell(by_impl[impl]['paired_ratios'][f'{mode} run ahead'])} "
                                   f"({impl.split(', ', 1)[1]})" for impl in variants[mode]))
        lines.append(f"| `{mode}` | {', '.join(str(c) for c in calls)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="default: float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--other-weaver", action="store_true",
                        help="also run ahead with each mode's weaver placed the other way than the device's "
                             "default (memgen.generation.JOINT_WEAVER_MODES)")
    parser.add_argument("--copies", action="store_true",
                        help="also run ahead with a cache copy per item in calls of one item per batch row, instead "
                             "of attending to each row's cache in place (memgen.generation.BY_ROW_ATTENTION)")
    parser.add_argument("--out", help="write results.json, results.md and results.png here")
    args = parser.parse_args(argv)
    require_positive(parser, args, "batch", "new_tokens", "rounds")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    case = cases(args.preset, args.device, getattr(torch, dtype), args.batch, args.new_tokens, tuple(args.modes),
                 args.other_weaver, args.copies)
    records = measure(case, args.rounds, args.device)
    add_ratios(records)
    command = "python benchmarks/schedules.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"records": records, "sections": [comparison(records)],
               "meta": run_meta(args.preset, args.device, dtype, command)}
    print(markdown(results))
    if args.out:
        write(results, args.out)


if __name__ == "__main__":
    main()
