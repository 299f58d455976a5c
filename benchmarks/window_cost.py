"""What applying a sliding attention window costs the engine: the same model with and without a window that binds.

The reasoner (and the weaver, an adapter on it) gets a window on every other layer, shorter than the sequences, so
those layers attend through a mask of their own (`memgen.attention.windowed`) from the step the window starts to
bind; the other arm is the same weights without a window. Their tokens differ (the window changes what the model
computes), their amount of work does not: the same prompts, new tokens and (`always`) weaving points per delimiter.
Timed in interleaved rounds (the `memgen bench` harness); ratios are paired per round, with 95% intervals.

    python benchmarks/window_cost.py --preset small --batch 1 --window 64 --rounds 9 --out DIR
"""

from __future__ import annotations

import argparse
import sys

import torch

from memgen.bench.harness import Case, measure, require_positive, run_meta
from memgen.bench.report import add_ratios, markdown, write
from memgen.bench.workload import load_workload, prompt_batch


def cases(preset: str, batch: int, new_tokens: int, window: int) -> list[Case]:
    """Memory off, then `always`: each with and without the window (one case each, so that each pair's rounds
    interleave and its ratio is paired)."""
    workload = load_workload(preset)
    input_ids, mask = prompt_batch(workload, batch)
    models = {None: workload.memgen_model("always"), window: workload.memgen_model("always", sliding_window=window)}

    def generate(model, **kwargs):
        generator = torch.Generator().manual_seed(0)
        return model.generate(input_ids, mask, max_new_tokens=new_tokens, do_sample=True, generator=generator,
                              eos_token_id=workload.tokenizer.eos_token_id, return_dict_in_generate=True, **kwargs)

    def describe(impl: str, out) -> dict:
        return {"insertions_per_row": float((out.augmentation_mask == 1).sum(1).float().mean())}

    out = []
    for name, kwargs in (("memory off", dict(memory=False)), ("always", {})):
        impls = {name: lambda kwargs=kwargs: generate(models[None], **kwargs),
                 f"{name}, window {window}": lambda kwargs=kwargs: generate(models[window], **kwargs)}
        out.append(Case(f"{name}: without and with a window", f"{name} B{batch}",
                        dict(batch=batch, new_tokens=new_tokens, window=window), impls,
                        baselines=(name,), work=batch * new_tokens, unit="tokens", describe=describe))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", help="write results.json, results.md and results.png here")
    args = parser.parse_args(argv)
    require_positive(parser, args, "batch", "new_tokens", "window", "rounds")
    records = [r for case in cases(args.preset, args.batch, args.new_tokens, args.window)
               for r in measure(case, args.rounds, "cpu")]
    add_ratios(records)
    command = "python benchmarks/window_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"records": records, "meta": run_meta(args.preset, "cpu", "float32", command)}
    print(markdown(results))
    if args.out:
        write(results, args.out)


if __name__ == "__main__":
    main()
