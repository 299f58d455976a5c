"""Ragged-step ops (latent-token injection and the batched weaver forward's packing): each
implementation at batch 1 and 64, with Qwen2.5-1.5B's shapes (hidden 1536, 2 KV heads of 128) in
bfloat16, K = 8 latents and rows about 500 items long.

Run: pytest benchmarks/test_bench_ragged_ops.py --benchmark-json=benchmarks/results/ragged_ops_<machine>.json
then `python benchmarks/report.py <json>`. `extra_info["bytes"]` is the data each call moves.
"""

from __future__ import annotations

import pytest
import torch

from memgen.ops import pack_ragged, pack_step, selection, write_kv

HIDDEN, HEADS, HEAD_DIM, K, VOCAB, SEQ = 1536, 2, 128, 8, 151_936, 1024
DTYPE = torch.bfloat16


def _cases():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for op in ("pack_step", "pack_ragged", "write_kv"):
            for impl in ("torch", "native"):
                for batch in (1, 64):
                    yield pytest.param(device, op, impl, batch, id=f"{device}-{op}-{impl}-B{batch}")


def _call(op: str, batch: int, device: str):
    """The op's arguments for one decode-like call, and the bytes it moves."""
    g = torch.Generator().manual_seed(batch)
    lengths = torch.randint(400, 500, (batch,), generator=g, dtype=torch.int32)
    itemsize = torch.finfo(DTYPE).bits // 8
    if op == "pack_step":
        args = (torch.randint(0, VOCAB, (batch,), generator=g), torch.randn(VOCAB, HIDDEN).to(DTYPE),
                torch.randn(batch, K, HIDDEN, generator=g).to(DTYPE), torch.full((batch,), K, dtype=torch.int32),
                lengths, SEQ, int(lengths.max()) + 1 + K)
        moved = batch * (1 + K) * (2 * HIDDEN + args[-1]) * itemsize
    elif op == "pack_ragged":
        pending = torch.randint(1, 40, (batch,), generator=g, dtype=torch.int32)
        args = (torch.randn(batch, SEQ, HIDDEN, generator=g).to(DTYPE), torch.arange(batch), lengths - 40, pending,
                int(pending.max()), torch.randn(K, HIDDEN, generator=g).to(DTYPE), SEQ + K, int(lengths.max()) + K)
        moved = batch * (args[4] + K) * (2 * HIDDEN + args[-1]) * itemsize
    else:
        slots = (lengths.long()[:, None] + torch.arange(1 + K)).clamp(max=SEQ - 1)
        args = (torch.zeros(batch, HEADS, SEQ, HEAD_DIM, dtype=DTYPE), torch.zeros(batch, HEADS, SEQ, HEAD_DIM, dtype=DTYPE),
                torch.arange(batch), slots, torch.randn(batch, 1 + K, HEADS, HEAD_DIM, generator=g).to(DTYPE).transpose(1, 2),
                torch.randn(batch, HEADS, 1 + K, HEAD_DIM, generator=g).to(DTYPE))
        moved = 2 * 2 * batch * HEADS * (1 + K) * HEAD_DIM * itemsize
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args), moved


@pytest.mark.parametrize("device,op,impl,batch", list(_cases()))
def test_ragged_op(benchmark, device, op, impl, batch):
    reason = selection.unavailable_reason(impl, op, device)
    if reason is not None:
        pytest.skip(reason)
    args, moved = _call(op, batch, device)
    fn = {"pack_step": pack_step, "pack_ragged": pack_ragged, "write_kv": write_kv}[op]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        fn(*args, backend_name=impl)
        sync()

    for _ in range(10):
        step()
    benchmark.extra_info.update(device=device, op=op, impl=impl, batch=batch, torch=torch.__version__,
                                machine=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    benchmark.pedantic(step, rounds=100, iterations=5, warmup_rounds=2)
    benchmark.extra_info["bytes"] = moved
    benchmark.extra_info["gb_per_s"] = moved / benchmark.stats.stats.median / 1e9
