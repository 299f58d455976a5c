"""What the engine's run-ahead schedule saves, per trigger mode, against rows kept in step.

Kept in step (as the engine runs with a streamer or synced ranks), every weaving step makes a weaver
call, and with `head` and `lora` (a row decides after the reasoner has read its token) also a
reasoner call for the invoking rows' latents alone. By default rows run ahead of each other instead
(`memgen.generation`): a row that weaves reads its latents in a later step's call, beside the other
rows' tokens, and falls behind; where `JOINT_WEAVER_MODES` says so (`always` on a CPU) the weaver's
items go in the reasoner's calls too, so the weaver makes no call of its own after the prompt's.
Both schedules draw the same samples (one uniform per row and column), so their outputs are
identical and only the calls differ. This script times them side by side, with memory off as the
baseline, in interleaved rounds:

    python benchmarks/schedules.py --preset small --batch 16 --rounds 9 [--device cuda] --out DIR
"""

from __future__ import annotations

import argparse
import sys

import torch

from memgen.bench.decode_suite import weaver_calls
from memgen.bench.harness import Case, measure, run_meta
from memgen.bench.report import add_ratios, markdown, paired_cell, write
from memgen.bench.workload import load_workload, prompt_batch

MODES = ("always", "head", "lora")


class _InStep:
    """A streamer that keeps nothing: passing one keeps the rows in step."""

    def put(self, value: torch.Tensor) -> None:
        pass

    def end(self) -> None:
        pass


def cases(preset: str, device: str, dtype: torch.dtype, batch: int, new_tokens: int) -> Case:
    """Memory off, then each learned trigger in step and running ahead, on the decode suite's workload."""
    workload = load_workload(preset, device=device, dtype=dtype)
    input_ids, mask = prompt_batch(workload, batch)
    models = {mode: workload.memgen_model(mode) for mode in MODES}

    def generate(model, **kwargs):
        generator = torch.Generator(device=device).manual_seed(0)
        return model.generate(input_ids, mask, max_new_tokens=new_tokens, do_sample=True, generator=generator,
                              eos_token_id=workload.tokenizer.eos_token_id, return_dict_in_generate=True, **kwargs)

    impls = {"memory off": lambda: generate(models["lora"], memory=False)}
    for mode in MODES:
        impls[f"{mode} in step"] = lambda mode=mode: generate(models[mode], trigger_mode=mode, streamer=_InStep())
        impls[f"{mode} run ahead"] = lambda mode=mode: generate(models[mode], trigger_mode=mode)

    def describe(impl: str, result) -> dict:
        mode, schedule = (impl.split(" ", 1) + [""])[:2]
        if mode not in MODES:
            return {}
        return {"weaver_calls": weaver_calls(result.augmentation_mask, mode, device, in_step=schedule == "in step"),
                "insertions_per_row": float((result.augmentation_mask == 1).sum(1).float().mean())}

    return Case("decode", f"schedules-B{batch}", dict(batch=batch, new_tokens=new_tokens), impls,
                baselines=("memory off", *(f"{mode} in step" for mode in MODES)), work=batch * new_tokens, unit="tokens",
                describe=describe)


def comparison(records: list[dict]) -> str:
    """A Markdown section: per mode, its run-ahead time over its in-step time, paired per round (95% CI)."""
    by_impl = {r["impl"]: r for r in records}
    lines = ["## Run ahead over in step", "", "| mode | weaver calls (in step, run ahead) | paired ratio (95% CI) |",
             "|---|---|---|"]
    for mode in MODES:
        in_step, run_ahead = by_impl[f"{mode} in step"], by_impl[f"{mode} run ahead"]
        lines.append(f"| `{mode}` | {in_step['facts']['weaver_calls']}, {run_ahead['facts']['weaver_calls']} | "
                     f"{paired_cell(run_ahead['paired_ratios'][f'{mode} in step'])} |")
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
    parser.add_argument("--out", help="write results.json, results.md and results.png here")
    args = parser.parse_args(argv)
    for name in ("batch", "new_tokens", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    case = cases(args.preset, args.device, getattr(torch, dtype), args.batch, args.new_tokens)
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
