"""The ops suite: each compiled op family on every backend this machine has, at batch 1 and 64.

Shapes come from the workload's reasoner config (hidden size, vocabulary, KV heads and head size),
with K = 8 latents and rows about 450 items long, in the workload's dtype: what one decode step of
that model asks of each op. `bytes` (the data a ragged op moves) gives GB/s; trigger scoring
reports rows per second.
"""

from __future__ import annotations

from typing import Any

import torch

from memgen.bench.harness import Case
from memgen.bench.workload import Workload
from memgen.ops import pack_ragged, pack_step, selection, trigger_scoring, write_kv

BATCHES = (1, 64)
IMPLS = ("torch", "native", "triton")
K, SEQ = 8, 1024
_BUDGET = 2**30  # counts never reach it: every call does the same work
_RAGGED = {"pack_step": pack_step, "pack_ragged": pack_ragged, "write_kv": write_kv}


def _backends(op: str, device: torch.device) -> list[str]:
    """The implementations that can run `op` here; Triton only on a GPU (its CPU interpreter is a test tool)."""
    return [impl for impl in IMPLS if selection.unavailable_reason(impl, op, device.type) is None
            and not (impl == "triton" and device.type != "cuda")]


def _trigger_inputs(shape: dict[str, int], batch: int, mode: str, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(batch)
    vocab, hidden = shape["vocab"], shape["hidden"]
    inputs: dict[str, Any] = dict(
        last_tokens=torch.randint(0, vocab, (batch,), generator=g), delimiter_table=torch.rand(vocab, generator=g) < 0.5,
        counts=torch.zeros(batch, dtype=torch.int32), budget=_BUDGET, finished=torch.zeros(batch, dtype=torch.bool),
        trigger_mode=mode, do_sample=True, temperature=1.0, uniforms=torch.rand(batch, generator=g))
    if mode == "lora":
        inputs["logits"] = torch.randn(batch, 2, generator=g)
    if mode == "head":
        inputs.update(hidden=torch.randn(batch, hidden, generator=g).to(dtype),
                      head_weight=torch.randn(2, hidden, generator=g), head_bias=torch.randn(2, generator=g))
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _ragged_inputs(op: str, shape: dict[str, int], batch: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[tuple, int]:
    """One decode-like call's arguments, and the bytes it moves."""
    g = torch.Generator().manual_seed(batch)
    vocab, hidden, heads, head_dim = shape["vocab"], shape["hidden"], shape["kv_heads"], shape["head_dim"]
    lengths = torch.randint(400, 500, (batch,), generator=g, dtype=torch.int32)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if op == "pack_step":
        args = (torch.randint(0, vocab, (batch,), generator=g), torch.randn(vocab, hidden).to(dtype),
                torch.randn(batch, K, hidden, generator=g).to(dtype), torch.full((batch,), K, dtype=torch.int32),
                lengths, SEQ, int(lengths.max()) + 1 + K)
        moved = batch * (1 + K) * (2 * hidden + args[-1]) * itemsize
    elif op == "pack_ragged":
        pending = torch.randint(1, 40, (batch,), generator=g, dtype=torch.int32)
        args = (torch.randn(batch, SEQ, hidden, generator=g).to(dtype), torch.arange(batch), lengths - 40, pending,
                int(pending.max()), torch.randn(K, hidden, generator=g).to(dtype), SEQ + K, int(lengths.max()) + K)
        moved = batch * (args[4] + K) * (2 * hidden + args[-1]) * itemsize
    else:
        slots = (lengths.long()[:, None] + torch.arange(1 + K)).clamp(max=SEQ - 1)
        cache = (batch, heads, SEQ, head_dim)
        args = (torch.zeros(cache, dtype=dtype), torch.zeros(cache, dtype=dtype), torch.arange(batch), slots,
                torch.randn(batch, 1 + K, heads, head_dim, generator=g).to(dtype).transpose(1, 2),
                torch.randn(batch, heads, 1 + K, head_dim, generator=g).to(dtype))
        moved = 2 * 2 * batch * heads * (1 + K) * head_dim * itemsize
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args), moved


def _shape_of(workload: Workload) -> dict[str, int]:
    config = workload.config
    heads = config.num_attention_heads
    return dict(vocab=config.vocab_size, hidden=config.hidden_size,
                kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads)


def cases(workload: Workload, batches: tuple[int, ...] = BATCHES) -> list[Case]:
    """One case per op (and trigger mode) and batch size; the torch reference is the baseline."""
    device, dtype, shape = workload.device, workload.dtype, _shape_of(workload)
    out = []
    for batch in batches:
        for mode in ("always", "lora", "head"):
            inputs = _trigger_inputs(shape, batch, mode, dtype, device)
            impls = {impl: (lambda impl=impl, inputs=inputs: trigger_scoring(**inputs, backend_name=impl))
                     for impl in _backends("trigger_scoring", device)}
            out.append(Case("ops", f"trigger_scoring-{mode}-B{batch}",
                            dict(op="trigger_scoring", mode=mode, batch=batch), impls, baselines=("torch",),
                            work=batch, unit="rows", iterations=10, warmup=20))
        for op, fn in _RAGGED.items():
            args, moved = _ragged_inputs(op, shape, batch, dtype, device)
            impls = {impl: (lambda impl=impl, fn=fn, args=args: fn(*args, backend_name=impl))
                     for impl in _backends(op, device)}
            out.append(Case("ops", f"{op}-B{batch}", dict(op=op, mode="-", batch=batch, bytes=moved), impls,
                            baselines=("torch",), work=moved / 1e9, unit="GB", iterations=5, warmup=10))
    return out
