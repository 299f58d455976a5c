"""What one decoder call of the engine costs in each layout a weaving step could use.

At a batch step where G rows weave, rows kept in step make two calls: the weaver over the invoking
rows' W new items (padded to the widest: `[G, W]`), then the reasoner over every row's token plus
the invoking rows' K latents (one item per batch row on a CPU: `[B + G*K, 1]`; padded on a GPU, where
padding is nearly free: `[B, 1 + K]`). Running ahead, the engine puts the weaver's items in the same
call as the other rows' tokens instead (`joint`, one base-model pass with the weaver's LoRA on its
rows only; `memgen.generation.JOINT_WEAVER_MODES`), saving one pass over the weights per weaving
step. This script times those calls side by side (interleaved rounds, the `memgen bench` harness) on
a preset, so that such scheduling choices can be judged by numbers.

    python benchmarks/call_costs.py --preset small --batch 16 --weaving 2 --width 30 [--device cuda] --out DIR
"""

from __future__ import annotations

import argparse
import sys

import torch

from memgen.bench.calls import PREFIX, prefilled_decoder, repeatable_call
from memgen.bench.harness import Case, measure, run_meta
from memgen.bench.report import add_ratios, markdown, write
from memgen.bench.workload import load_workload


def cases(preset: str, device: str, dtype: torch.dtype, batch: int, weaving: int, width: int, latents: int) -> Case:
    model = load_workload(preset, device=device, dtype=dtype).memgen_model("always")
    capacity = PREFIX + width + latents + 1
    plain = prefilled_decoder(model.reasoner, None, batch, capacity)
    weaver = prefilled_decoder(model.weaver.model, model.weaver.adapter_name, batch, capacity)
    joint = prefilled_decoder(model.reasoner, None, batch, capacity, blocks=(model.weaver.adapter_name,))
    everyone, invoking = torch.arange(batch), torch.arange(weaving)
    others = torch.arange(weaving, batch)
    impls = {
        "plain step [B, 1]": repeatable_call(plain, everyone, 1),
        "weaver [G, W]": repeatable_call(weaver, invoking, width),
        "reasoner tokens + latents [B + G*K, 1]": repeatable_call(
            plain, torch.cat([everyone, invoking.repeat_interleave(latents)]), 1),
        "reasoner tokens + latents, padded [B, 1 + K]": repeatable_call(plain, everyone, 1 + latents),
        "joint: others' tokens + weaver [B - G + G*W, 1]": repeatable_call(
            joint, torch.cat([others, (invoking + batch).repeat_interleave(width)]), 1, (batch - weaving,)),
        "joint padded [B, W]": repeatable_call(joint, torch.cat([others, invoking + batch]), width, (batch - weaving,)),
    }
    return Case("calls", f"B{batch}-G{weaving}-W{width}", dict(batch=batch, weaving=weaving, width=width, latents=latents),
                impls, baselines=("plain step [B, 1]",), iterations=5, warmup=3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--batch", type=int, default=16, help="B: rows in the batch")
    parser.add_argument("--weaving", type=int, default=2, help="G: rows weaving at the step")
    parser.add_argument("--width", type=int, default=30, help="W: the weaver's items per weaving row (new items + K queries)")
    parser.add_argument("--latents", type=int, default=8, help="K")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", help="write results.json, results.md and results.png here")
    args = parser.parse_args(argv)
    if not 1 <= args.weaving < args.batch:
        parser.error(f"--weaving must be in 1 .. {args.batch - 1} (some rows weave, some do not), got {args.weaving}")
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    case = cases(args.preset, args.device, getattr(torch, dtype), args.batch, args.weaving, args.width, args.latents)
    records = measure(case, args.rounds, args.device)
    add_ratios(records)
    command = "python benchmarks/call_costs.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"records": records, "meta": run_meta(args.preset, args.device, dtype, command)}
    print(markdown(results))
    if args.out:
        write(results, args.out)


if __name__ == "__main__":
    main()
