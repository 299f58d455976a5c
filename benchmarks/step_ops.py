"""How many tensor operations a decode step issues outside the decoder's layers, per configuration.

Outside its layers a step samples the tokens, keeps the rows' books, packs the call and records the
caches' lengths. Each of those operations costs a dispatch on the CPU, and on a GPU a kernel launch or
a host operation on the path of the next launch; at a small batch they are a step's fixed cost (a small
model on a GPU is bound by launching kernels). Unlike a time, a count does not move with the machine's
noise: the same code and workload give the same count, so a change to the engine can be judged by it
exactly. The script runs the decode suite's configurations (`memgen.bench.decode_suite`) once each
under the torch profiler, after one call that is not profiled, and counts per generated token:

- ops outside: the operations that do work (no views, no allocations; a composite op counts as the
  operations it runs) issued by the engine or by Hugging Face `generate`, not within a decoder layer,
  the rotary embedding or the final norm;
- ops inside: the same within those modules;
- transfers: the copies by which the engine sends host tensors (the rows, counts and cache lengths it
  keeps on the host) to the device, several tensors packed in one (`memgen.transfers`). On a GPU each
  is a host copy into pinned memory and an asynchronous copy; on a CPU the tensors stay where they are
  and no op counts them, so this is the part of a GPU step's fixed cost that a CPU's op counts miss.
  Hugging Face `generate` keeps its books on the device: none;
- on CUDA, also the kernel launches and the host-device copies outside and inside.

`--layout cuda` lays the calls out as the engine does on a GPU (`memgen.generation.PACKED_PADDING_ITEMS`,
`JOINT_WEAVER_MODES`) whatever the device, so a CPU counts the operations a GPU's layout issues (each
of them a kernel launch there, a few copies aside) without a GPU.

    python benchmarks/step_ops.py --preset tiny --batch 1 --new-tokens 64 [--impls memory_off always]
        [--device cuda] [--layout cuda] --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from memgen import generation
from memgen.bench import decode_suite
from memgen.bench.harness import require_positive, run_meta, synchronize
from memgen.bench.report import machine_line
from memgen.bench.workload import load_workload

IMPLS = tuple(impl for impl in decode_suite.IMPLS if impl != "reference")  # the reference recomputes every prefix
DECODER = "memgen.step_ops.decoder"  # the profiler range around each decoder module's forward
# Operations that do no work of their own: views, allocations, and composites that returned their input.
METADATA = frozenset(f"aten::{name}" for name in (
    "view", "_unsafe_view", "_reshape_alias", "reshape", "flatten", "unflatten", "slice", "select", "narrow",
    "as_strided", "unsqueeze", "squeeze", "t", "transpose", "permute", "expand", "expand_as", "alias", "detach",
    "detach_", "unbind", "split", "chunk", "empty", "empty_strided", "empty_like", "new_empty", "lift_fresh",
    "resolve_conj", "resolve_neg", "to", "contiguous", "item", "_local_scalar_dense", "is_nonzero", "matmul",
    "linear", "dropout", "result_type", "size", "stride", "dim"))


def _mark_decoder_modules(model: torch.nn.Module) -> list:
    """Profiler ranges around the forward of each layer, the rotary embedding and the final norm of `model`'s
    decoder; returns the hooks' handles."""
    decoder = model.get_decoder()
    modules = [*decoder.layers, decoder.norm, getattr(decoder, "rotary_emb", None)]
    open_ranges = []

    def enter(module, args):
        open_ranges.append(record_function(DECODER))
        open_ranges[-1].__enter__()

    def leave(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    return [hook for m in modules if m is not None
            for hook in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]


def _is_op(event) -> bool:
    return event.name.startswith(("aten::", "memgen::"))


def _within_decoder(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == DECODER:
            return True
        parent = parent.cpu_parent
    return False


def count(events) -> dict[str, int]:
    """Operations that do work, kernel launches and host-device copies among profiler `events`, outside and
    inside the decoder modules' ranges."""
    counts = dict.fromkeys(("ops_outside", "ops_inside", "launches_outside", "launches_inside", "copies_outside",
                            "copies_inside"), 0)
    for event in events:
        if _is_op(event):
            # leaves only: a composite op counts as the operations it runs
            if event.name in METADATA or any(_is_op(child) for child in event.cpu_children):
                continue
            kind = "ops"
        elif event.device_type != DeviceType.CPU:  # the GPU's own records of kernels and copies: counted at launch
            continue
        elif "LaunchKernel" in event.name:
            kind = "launches"
        elif "Memcpy" in event.name:
            kind = "copies"
        else:
            continue
        counts[f"{kind}_{'inside' if _within_decoder(event) else 'outside'}"] += 1
    return counts


@contextlib.contextmanager
def counting_transfers():
    """Counts the copies to the device (`_Engine.to_device`, each of one or several host tensors) that generate
    calls in the block make: yields a one-key dict whose "transfers" grows as they are made."""
    seen = {"transfers": 0}
    original = generation._Engine.to_device

    def counted(engine, *host):
        seen["transfers"] += bool(host)
        return original(engine, *host)

    generation._Engine.to_device = counted
    try:
        yield seen
    finally:
        generation._Engine.to_device = original


@contextlib.contextmanager
def laid_out_as(device_type: str, layout: str):
    """Within: the engine lays calls on `device_type` out as it does on `layout`'s devices."""
    tables = (generation.PACKED_PADDING_ITEMS, generation.JOINT_WEAVER_MODES)
    saved = [table.get(device_type) for table in tables]
    for table in tables:
        table[device_type] = table[layout]
    try:
        yield
    finally:
        for table, value in zip(tables, saved):
            table[device_type] = value


def step_ops(preset: str, device: str, dtype: torch.dtype, batch: int, new_tokens: int,
             impls: tuple[str, ...], layout: str | None = None) -> dict[str, dict[str, float]]:
    """Per implementation, each of `count`'s figures per generated token (one profiled generate call); layout:
    the device type whose call layout the engine uses (default: the device's own)."""
    device_type = torch.device(device).type
    with laid_out_as(device_type, layout or device_type):
        return _step_ops(preset, device, dtype, batch, new_tokens, impls)


def _step_ops(preset: str, device: str, dtype: torch.dtype, batch: int, new_tokens: int,
              impls: tuple[str, ...]) -> dict[str, dict[str, float]]:
    workload = load_workload(preset, device=device, dtype=dtype)
    case, = decode_suite.cases(workload, (batch,), new_tokens)
    handles = [h for mode in ("lora", "head") for h in _mark_decoder_modules(workload.memgen_model(mode).reasoner)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    out = {}
    try:
        for impl in impls:
            fn = case.impls[impl]
            fn()
            synchronize(device)
            with profile(activities=activities) as prof, counting_transfers() as transfers:
                fn()
                synchronize(device)
            counts = {**count(prof.events()), **transfers}
            out[impl] = {name: value / new_tokens for name, value in counts.items()}
    finally:
        for handle in handles:
            handle.remove()
    return out


def markdown(results: dict) -> str:
    cuda = results["meta"]["device"].startswith("cuda")
    columns = ["ops outside", "ops inside", "transfers"] + (["launches outside", "launches inside", "copies outside",
                                                 "copies inside"] if cuda else [])
    layout = results.get("layout")
    lines = [f"# memgen step ops: {machine_line(results['meta'])}", "",
             *([f"Calls laid out as on a {layout} device.", ""] if layout else []),
             f"Per generated token, batch {results['batch']}, {results['new_tokens']} new tokens; one generate call "
             "each, under the torch profiler. Outside: issued by the engine (or Hugging Face `generate`) itself; "
             "inside: within a decoder layer, the rotary embedding or the final norm. Ops: the operations that do "
             "work (views and allocations left out). Transfers: copies of host tensors the engine sends to the "
             "device (on a GPU a copy into pinned memory and an asynchronous copy each; on a CPU none happens).",
             "",
             "| implementation | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for impl, counts in results["step_ops"].items():
        cells = [f"{counts[name.replace(' ', '_')]:.1f}" for name in columns]
        lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", f"Command: `{results['meta']['command']}`"]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="default: float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--layout", choices=sorted(generation.PACKED_PADDING_ITEMS),
                        help="lay the engine's calls out as on this kind of device (default: the device's own)")
    parser.add_argument("--out", help="write results.json and results.md here")
    args = parser.parse_args(argv)
    require_positive(parser, args, "batch", "new_tokens")
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    counts = step_ops(args.preset, args.device, getattr(torch, dtype), args.batch, args.new_tokens, tuple(args.impls),
                      args.layout)
    command = "python benchmarks/step_ops.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"step_ops": counts, "batch": args.batch, "new_tokens": args.new_tokens,
               "meta": run_meta(args.preset, args.device, dtype, command)}
    if args.layout:
        results["layout"] = args.layout
    print(markdown(results))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / "results.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
