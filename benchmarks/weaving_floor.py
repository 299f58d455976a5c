"""The least time weaving can add to a batch's decoding on a CPU, whatever the engine's schedule.

Whatever the order of calls, MemGen's weaving makes the weaver read every row's stream up to its last
weave plus K queries per weave, and the reasoner read K latents per weave (DESIGN.md section 3). This
script counts those items from each trigger mode's run (its augmentation mask), times large batched
calls (`[B, W]` items, where a CPU's cost per item is lowest: a step's items cost about the same
whether they ride in another call or not), and so bounds a mode's generate time over memory off from
below:

    floor = (memory off + weaver items x weaver's cost per item + latents x reasoner's cost per item)
            / memory off

Everything is timed in the same interleaved rounds (the `memgen bench` harness); floors and measured
ratios are paired per round, with 95% intervals. Where a floor exceeds a target, no scheduling
change to the engine can meet the target on that machine and model. On a GPU a small model's calls
cost launches, not items, and this bound says little, so the script runs on the CPU.

    python benchmarks/weaving_floor.py --preset small --batch 16 --rounds 15 --out DIR
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from memgen.bench.calls import PREFIX, prefilled_decoder, repeatable_call
from memgen.bench.decode_suite import weaving_steps
from memgen.bench.harness import Case, measure, require_positive, run_meta
from memgen.bench.report import add_ratios, markdown, median_interval, paired_cell, write
from memgen.bench.workload import load_workload, prompt_batch


def weaving_items(augmentation_mask: torch.Tensor, prompt_lengths: torch.Tensor, k_prompt: int,
                  k_inference: int) -> tuple[int, int]:
    """(weaver items, latents) a generate call's weaving had to process, from its augmentation mask [B, T]
    (column 0: the prompt weave; column c > 0: a weave before new token c) and each row's prompt length [B].

    The weaver reads each row's stream once, up to its last weave: the prompt, the tokens before that weave
    and the latents of the row's earlier weaves, plus K queries per weave. The reasoner reads K latents per
    weave.
    """
    weaver, latents = 0, 0
    for row, prompt_length in zip(augmentation_mask.cpu(), prompt_lengths.tolist()):
        prompt_weave = int(row[0] == 1)
        columns = (row[1:] == 1).nonzero().flatten() + 1
        woven = k_prompt * prompt_weave + k_inference * columns.numel()
        if not woven:
            continue
        stream = prompt_length  # at the prompt weave; a later weave also sees what came after it
        if columns.numel():
            stream += k_prompt * prompt_weave + int(columns[-1]) + k_inference * (columns.numel() - 1)
        weaver += stream + woven
        latents += woven
    return weaver, latents


MODES = ("always", "head", "lora")


def cases(preset: str, batch: int, new_tokens: int, width: int) -> tuple[Case, dict[str, dict[str, int]]]:
    """The case (memory off, each trigger mode, the two per-item calls) and, per mode, the items its run wove."""
    workload = load_workload(preset)
    input_ids, mask = prompt_batch(workload, batch)

    def generate(model, **kwargs):
        generator = torch.Generator().manual_seed(0)
        return model.generate(input_ids, mask, max_new_tokens=new_tokens, do_sample=True, generator=generator,
                              eos_token_id=workload.tokenizer.eos_token_id, return_dict_in_generate=True, **kwargs)

    models = {mode: workload.memgen_model(mode) for mode in MODES}
    items = {}
    for mode, model in models.items():
        run = generate(model, trigger_mode=mode)
        weaver_items, latents = weaving_items(run.augmentation_mask, mask.sum(1), model.config.prompt_latents_len,
                                              model.config.inference_latents_len)
        items[mode] = dict(weaver_items=weaver_items, latents=latents,
                           weaving_steps=weaving_steps(run.augmentation_mask, mode))
    model = models["always"]
    capacity = PREFIX + width + 1
    everyone = torch.arange(batch)
    impls = {"memory off": lambda: generate(model, memory=False)}
    impls.update({mode: lambda mode=mode: generate(models[mode], trigger_mode=mode) for mode in MODES})
    impls["weaver [B, W]"] = repeatable_call(
        prefilled_decoder(model.weaver.model, model.weaver.adapter_name, batch, capacity), everyone, width)
    impls["reasoner [B, W]"] = repeatable_call(prefilled_decoder(model.reasoner, None, batch, capacity), everyone,
                                               width)
    case = Case("floor", f"B{batch}", dict(batch=batch, new_tokens=new_tokens, width=width), impls,
                baselines=("memory off",))
    return case, items


def floor(records: list[dict], items: dict[str, dict[str, int]], batch: int, width: int) -> dict:
    """Per mode: its items, and the per-round floor and measured ratios over memory off (medians, 95% intervals)."""
    times = {r["impl"]: r["times_s"] for r in records}
    per_item = {name: [t / (batch * width) for t in times[name]] for name in ("weaver [B, W]", "reasoner [B, W]")}

    def summary(values: list[float]) -> dict:
        interval = median_interval(values)
        return {"median": statistics.median(values), "low": interval and interval[0],
                "high": interval and interval[1]}

    out = {"per_item_ms": {name: statistics.median(v) * 1e3 for name, v in per_item.items()}}
    for mode, counts in items.items():
        floors = [(off + counts["weaver_items"] * w + counts["latents"] * r) / off
                  for off, w, r in zip(times["memory off"], per_item["weaver [B, W]"], per_item["reasoner [B, W]"])]
        measured = [t / off for t, off in zip(times[mode], times["memory off"])]
        out[mode] = dict(counts, floor_ratio=summary(floors), measured_ratio=summary(measured))
    return out


def floor_markdown(result: dict) -> str:
    per_item = result["per_item_ms"]
    lines = ["## Floor", "",
             f"Cost per item in a [B, W] call: weaver {per_item['weaver [B, W]']:.3f} ms, reasoner "
             f"{per_item['reasoner [B, W]']:.3f} ms. Ratios over memory off, paired per round (95% CI). The floor "
             "counts the weaver's items and the latents only (not the `lora` trigger's own reading).", "",
             "| mode | weaving steps | weaver items | latents | floor | measured |", "|---|---|---|---|---|---|"]
    for mode in MODES:
        r = result[mode]
        lines.append(f"| `{mode}` | {r['weaving_steps']} | {r['weaver_items']} | {r['latents']} | "
                     f"{paired_cell(r['floor_ratio'])} | {paired_cell(r['measured_ratio'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--width", type=int, default=64, help="W: items per row in the per-item calls")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", help="write results.json, results.md and results.png here")
    args = parser.parse_args(argv)
    require_positive(parser, args, "batch", "new_tokens", "width", "rounds")
    case, items = cases(args.preset, args.batch, args.new_tokens, args.width)
    records = measure(case, args.rounds, "cpu")
    add_ratios(records)
    result = floor(records, items, args.batch, args.width)
    command = "python benchmarks/weaving_floor.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"records": records, "floor": result, "sections": [floor_markdown(result)],
               "meta": run_meta(args.preset, "cpu", "float32", command)}
    print(markdown(results))
    if args.out:
        write(results, args.out)


if __name__ == "__main__":
    main()
