"""Fused trigger scoring: each implementation at a small and a large batch, every mode.

Run: pytest benchmarks/test_bench_trigger_scoring.py --benchmark-json=benchmarks/results/trigger_scoring_<machine>.json
then `python benchmarks/report.py <json>` for the Markdown table. CUDA and Triton rows appear where
a GPU is present; CPU rows compare the PyTorch reference with the C++ kernel.
"""

from __future__ import annotations

import pytest
import torch

from memgen.ops import selection, trigger_scoring

HIDDEN = 1536  # Qwen2.5-1.5B's hidden size: the `head` mode's dot products
VOCAB = 151_936  # Qwen2.5's embedding rows: the delimiter table's length
BUDGET = 2**30  # counts never reach it, so every call does the same work


def _cases():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for impl in ("torch", "native", "triton"):
            if impl == "triton" and device == "cpu":
                continue  # the interpreter is a correctness tool, not a backend to time
            for batch in (1, 64):
                for mode in ("always", "lora", "head"):
                    yield pytest.param(device, impl, batch, mode, id=f"{device}-{impl}-B{batch}-{mode}")


def _inputs(device: str, batch: int, mode: str) -> dict:
    g = torch.Generator().manual_seed(batch)
    inputs = dict(
        last_tokens=torch.randint(0, VOCAB, (batch,), generator=g),
        delimiter_table=torch.rand(VOCAB, generator=g) < 0.5,
        counts=torch.zeros(batch, dtype=torch.int32),
        budget=BUDGET,
        finished=torch.zeros(batch, dtype=torch.bool),
        trigger_mode=mode,
        do_sample=True,
        temperature=1.0,
        uniforms=torch.rand(batch, generator=g),
    )
    if mode == "lora":
        inputs["logits"] = torch.randn(batch, 2, generator=g)
    if mode == "head":
        inputs["hidden"] = torch.randn(batch, HIDDEN, generator=g).to(torch.bfloat16)
        inputs["head_weight"] = torch.randn(2, HIDDEN, generator=g)
        inputs["head_bias"] = torch.randn(2, generator=g)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.mark.parametrize("device,impl,batch,mode", list(_cases()))
def test_trigger_scoring(benchmark, device, impl, batch, mode):
    reason = selection.unavailable_reason(impl, "trigger_scoring", device)
    if reason is not None:
        pytest.skip(reason)
    inputs = _inputs(device, batch, mode)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        trigger_scoring(**inputs, backend_name=impl)
        sync()

    for _ in range(20):  # warm-up: library loading, Triton compilation, allocator
        step()
    benchmark.extra_info.update(device=device, impl=impl, batch=batch, mode=mode, torch=torch.__version__,
                                machine=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    benchmark.pedantic(step, rounds=200, iterations=10, warmup_rounds=2)
    benchmark.extra_info["rows_per_s"] = batch / benchmark.stats.stats.median
