"""What one decoder call of the engine costs in each layout a weaving step could use.

At a batch step where G rows weave, memgen's engine makes two calls: the weaver over the invoking rows'
W new items (padded to the widest: `[G, W]`), then the reasoner over every row's token plus the
invoking rows' K latents (one item per batch row on a CPU: `[B + G*K, 1]`; padded on a GPU, where
padding is nearly free: `[B, 1 + K]`). A scheduler that let the
other rows run ahead would instead put the weaver's items in the same call as those rows' tokens
(`joint`, one base-model pass with the weaver's LoRA on its rows only), saving one pass over the
weights per weaving step. This script times those calls side by side (interleaved rounds, the
`memgen bench` harness) on a preset, so that such a scheduling change can be judged by numbers.

    python benchmarks/call_costs.py --preset small --batch 16 --weaving 2 --width 30 [--device cuda] --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch

from memgen.bench.harness import Case, machine_info, measure
from memgen.bench.report import add_ratios, markdown, write
from memgen.bench.workload import load_workload
from memgen.generation import _RaggedDecoder
from memgen.ops import pack_ragged

PREFIX = 100  # items each cache row holds before the timed calls (a row some way into its answer)


def _packed(decoder: _RaggedDecoder, rows: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
    """A packed call feeding `width` random items to each of cache rows `rows` (host int64; repeats: one batch
    row each), after what each row has read."""
    device = decoder.device
    stream = torch.randn(decoder.lengths.shape[0], decoder.capacity + 1, decoder.width, device=device,
                         generator=torch.Generator(device).manual_seed(0)).to(decoder.dtype) * 0.02
    lengths = decoder.lengths[rows]
    return pack_ragged(stream, rows.to(device), lengths.to(device),
                       torch.full((rows.shape[0],), width, dtype=torch.int32, device=device), width, None,
                       decoder.capacity, int(lengths.max()) + width)


def _decoder(model, adapter: str | None, batch: int, capacity: int, split: str | None = None) -> _RaggedDecoder:
    """A ragged decoder whose every cache row has read PREFIX random items."""
    device = model.get_input_embeddings().weight.device
    decoder = _RaggedDecoder(model, adapter, batch, capacity, device, split=split)
    rows = torch.arange(decoder.lengths.shape[0])
    with torch.no_grad():
        decoder.run(rows.shape[0], _packed(decoder, rows, PREFIX), rows,
                    torch.full((rows.shape[0],), PREFIX, dtype=torch.int32))
    return decoder


def _call(decoder: _RaggedDecoder, rows: torch.Tensor, width: int, split_from: int | None = None):
    """A call feeding `width` items to each of cache rows `rows` (host int64; repeats: one batch row per item),
    leaving the cache lengths as they are, so that every round times the same call."""
    packed, rows_device = _packed(decoder, rows, width), rows.to(decoder.device)
    advance = rows.unique()
    unchanged = torch.zeros(advance.shape[0], dtype=torch.int32)

    @torch.no_grad()
    def run() -> None:
        decoder.run(rows_device, packed, advance, unchanged, split_from)

    return run


def cases(preset: str, device: str, dtype: torch.dtype, batch: int, weaving: int, width: int, latents: int) -> Case:
    model = load_workload(preset, device=device, dtype=dtype).memgen_model("always")
    capacity = PREFIX + width + latents + 1
    plain = _decoder(model.reasoner, None, batch, capacity)
    weaver = _decoder(model.weaver.model, model.weaver.adapter_name, batch, capacity)
    joint = _decoder(model.reasoner, None, batch, capacity, split=model.weaver.adapter_name)
    everyone, invoking = torch.arange(batch), torch.arange(weaving)
    others = torch.arange(weaving, batch)
    impls = {
        "plain step [B, 1]": _call(plain, everyone, 1),
        "weaver [G, W]": _call(weaver, invoking, width),
        "reasoner tokens + latents [B + G*K, 1]": _call(plain, torch.cat([everyone, invoking.repeat_interleave(latents)]),
                                                        1),
        "reasoner tokens + latents, padded [B, 1 + K]": _call(plain, everyone, 1 + latents),
        "joint: others' tokens + weaver [B - G + G*W, 1]": _call(
            joint, torch.cat([others, (invoking + batch).repeat_interleave(width)]), 1, batch - weaving),
        "joint padded [B, W]": _call(joint, torch.cat([others, invoking + batch]), width, batch - weaving),
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
    results = {"records": records, "meta": dict(
        workload=args.preset, device=args.device, dtype=dtype, machine=machine_info(args.device),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command="python benchmarks/call_costs.py " + " ".join(argv if argv is not None else sys.argv[1:]))}
    print(markdown(results))
    if args.out:
        write(results, args.out)


if __name__ == "__main__":
    main()
