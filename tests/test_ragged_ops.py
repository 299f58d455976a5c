"""Ragged-step ops (pack_step, pack_ragged, write_kv): native kernels against the PyTorch reference,
opcheck, and bad input on every backend."""

from __future__ import annotations

import pytest
import torch

from memgen.ops import (
    pack_ragged,
    pack_ragged_reference,
    pack_step,
    pack_step_reference,
    write_kv,
    write_kv_reference,
)
from memgen.ops import selection

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _native(op: str, device: str) -> None:
    reason = selection.unavailable_reason("native", op, device)
    if reason is not None:
        pytest.skip(reason)


def step_inputs(seed: int, groups: int, dtype: torch.dtype, with_tokens: bool, with_latents: bool,
                device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab, dim, k = 37, 13, 5
    lengths = torch.randint(0, 20, (groups,), generator=g, dtype=torch.int32)
    n_latents = torch.randint(0, k + 1, (groups,), generator=g, dtype=torch.int32)
    capacity = int(lengths.max()) + 1 + k + int(torch.randint(0, 4, (), generator=g))
    visible = int((lengths + int(with_tokens) + (n_latents if with_latents else 0)).max()) + int(
        torch.randint(0, 3, (), generator=g))
    inputs = dict(
        tokens=torch.randint(0, vocab, (groups,), generator=g) if with_tokens else None,
        embed_weight=torch.randn(vocab, dim, generator=g).to(dtype),
        latents=torch.randn(groups, k, dim, generator=g).to(dtype) if with_latents else None,
        n_latents=n_latents if with_latents else None,
        lengths=lengths,
        capacity=capacity,
        visible=min(max(visible, 1), capacity),
    )
    return {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in inputs.items()}


def ragged_inputs(seed: int, groups: int, dtype: torch.dtype, with_queries: bool, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    batch, seq, dim, k = groups + 3, 31, 11, 4
    rows = torch.randperm(batch, generator=g)[:groups]
    lengths = torch.randint(0, 15, (groups,), generator=g, dtype=torch.int32)
    pending = torch.minimum(torch.randint(0, 9, (groups,), generator=g, dtype=torch.int32), seq - lengths)
    width = int(pending.max()) + int(torch.randint(0, 3, (), generator=g)) if groups else 0
    k_used = k if with_queries else 0
    capacity = int((lengths + pending).max()) + k_used + 2 if groups else 4
    inputs = dict(
        stream=torch.randn(batch, seq, dim, generator=g).to(dtype),
        rows=rows,
        lengths=lengths,
        pending=pending,
        width=width,
        queries=torch.randn(k, dim, generator=g).to(dtype) if with_queries else None,
        capacity=capacity,
        visible=max(int((lengths + pending).max()) + k_used, 1) if groups else 1,
    )
    return {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in inputs.items()}


def write_inputs(seed: int, groups: int, dtype: torch.dtype, strided: bool, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    batch, heads, seq, head_dim, items = groups + 2, 3, 17, 7, 4
    rows = torch.randperm(batch, generator=g)[:groups]
    slots = torch.stack([torch.randperm(seq - 1, generator=g)[:items] for _ in range(groups)]) if groups else \
        torch.zeros(0, items, dtype=torch.long)
    slots[torch.rand(slots.shape, generator=g) < 0.2] = seq - 1  # padding items share the scratch slot
    if strided:  # as attention layers produce them: [G, T, H, D] transposed
        new_keys = torch.randn(groups, items, heads, head_dim, generator=g).to(dtype).transpose(1, 2)
    else:
        new_keys = torch.randn(groups, heads, items, head_dim, generator=g).to(dtype)
    inputs = dict(
        keys=torch.randn(batch, heads, seq, head_dim, generator=g).to(dtype),
        values=torch.randn(batch, heads, seq, head_dim + 2, generator=g).to(dtype),
        rows=rows,
        slots=slots,
        new_keys=new_keys,
        new_values=torch.randn(groups, heads, items, head_dim + 2, generator=g).to(dtype),
    )
    return {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in inputs.items()}


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts", ["tokens", "latents", "both"])
def test_pack_step_native_equals_reference(device, dtype, parts):
    _native("pack_step", device)
    for seed, groups in zip(range(4), (1, 3, 16, 29)):
        inputs = step_inputs(seed, groups, dtype, parts != "latents", parts != "tokens", device)
        got = pack_step(**inputs, backend_name="native")
        want = pack_step_reference(**inputs)
        for name, a, b in zip(("items", "positions", "slots", "mask"), got, want):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(a, b), (name, seed)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_queries", [True, False])
def test_pack_ragged_native_equals_reference(device, dtype, with_queries):
    _native("pack_ragged", device)
    for seed, groups in zip(range(4), (1, 2, 7, 19)):
        inputs = ragged_inputs(seed, groups, dtype, with_queries, device)
        got = pack_ragged(**inputs, backend_name="native")
        want = pack_ragged_reference(**inputs)
        for name, a, b in zip(("items", "positions", "slots", "mask"), got, want):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(a, b), (name, seed)


def test_pack_layout_semantics():
    """A hand-checked case: row 0 has 2 cached items and reads a token and 1 of 2 latents."""
    embed = torch.arange(12.0).view(6, 2)
    latents = torch.tensor([[[10.0, 11.0], [12.0, 13.0]]])
    items, positions, slots, mask = pack_step_reference(torch.tensor([4]), embed, latents,
                                                        torch.tensor([1], dtype=torch.int32),
                                                        torch.tensor([2], dtype=torch.int32), 8, 5)
    assert items.tolist() == [[[8.0, 9.0], [10.0, 11.0], [0.0, 0.0]]]
    assert positions.tolist() == [[2, 3, 3]] and slots.tolist() == [[2, 3, 8]]
    open_keys = (mask[0, 0] == 0).sum(-1).tolist()
    assert open_keys == [3, 4, 4]  # each real item sees itself and the row before it; padding sees the row


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
def test_write_kv_native_equals_reference(device, dtype, strided):
    _native("write_kv", device)
    for seed, groups in zip(range(3), (1, 4, 11)):
        inputs = write_inputs(seed, groups, dtype, strided, device)
        mine = {k: v.clone() if k in ("keys", "values") else v for k, v in inputs.items()}
        write_kv(**mine, backend_name="native")
        write_kv_reference(**inputs)
        for name in ("keys", "values"):  # the scratch slot (last) may hold any padding item's write
            assert torch.equal(mine[name][:, :, :-1], inputs[name][:, :, :-1]), (name, seed)


def test_opcheck():
    _native("pack_step", "cpu")
    for device in _devices():
        for parts in ((True, False), (False, True), (True, True)):
            inputs = step_inputs(5, 6, torch.float32, *parts, device=device)
            torch.library.opcheck(torch.ops.memgen.pack_step.default, tuple(inputs.values()))
        for with_queries in (True, False):
            inputs = ragged_inputs(6, 5, torch.float32, with_queries, device=device)
            torch.library.opcheck(torch.ops.memgen.pack_ragged.default, tuple(inputs.values()))
        inputs = write_inputs(7, 3, torch.float32, True, device=device)
        inputs["slots"] = inputs["slots"][:, :1]  # distinct slots: a deterministic result for opcheck's replays
        inputs["new_keys"], inputs["new_values"] = inputs["new_keys"][:, :, :1], inputs["new_values"][:, :, :1]
        torch.library.opcheck(torch.ops.memgen.write_kv.default, tuple(inputs.values()))


BAD_STEP = [
    (dict(lengths=torch.tensor([1.0])), "lengths"),
    (dict(tokens=torch.tensor([1, 2])), "tokens"),
    (dict(tokens=torch.tensor([99])), "token items outside"),
    (dict(tokens=None, latents=None, n_latents=None), "nothing to pack"),
    (dict(latents=torch.zeros(1, 2, 5)), "latents"),
    (dict(n_latents=None), "n_latents"),
    (dict(n_latents=torch.tensor([3], dtype=torch.int32)), "latent items"),
    (dict(capacity=3), "capacity"),
    (dict(visible=2), "visible"),
    (dict(embed_weight=torch.zeros(8, 4, dtype=torch.int32)), "embed_weight"),
]


@pytest.mark.parametrize("impl", ["torch", "native"])
@pytest.mark.parametrize("change,match", BAD_STEP, ids=[m for _, m in BAD_STEP])
def test_pack_step_rejects_bad_input(impl, change, match):
    if impl == "native":
        _native("pack_step", "cpu")
    inputs = dict(tokens=torch.tensor([3]), embed_weight=torch.zeros(8, 4), latents=torch.zeros(1, 2, 4),
                  n_latents=torch.tensor([2], dtype=torch.int32), lengths=torch.tensor([1], dtype=torch.int32),
                  capacity=6, visible=5)
    inputs.update(change)
    with pytest.raises(ValueError, match=match):
        pack_step(**inputs, backend_name=impl)


BAD_RAGGED = [
    (dict(rows=torch.tensor([0], dtype=torch.int32)), "rows"),
    (dict(rows=torch.tensor([5])), "pending items outside"),
    (dict(pending=torch.tensor([4], dtype=torch.int32)), "pending items"),
    (dict(lengths=torch.tensor([-1], dtype=torch.int32)), "lengths"),
    (dict(lengths=torch.tensor([5], dtype=torch.int32), capacity=20, visible=10), "outside their source"),
    (dict(queries=torch.zeros(2, 3)), "queries"),
    (dict(stream=torch.zeros(2, 6, 4, dtype=torch.int64)), "stream"),
    (dict(width=-1), "width"),
]


@pytest.mark.parametrize("impl", ["torch", "native"])
@pytest.mark.parametrize("change,match", BAD_RAGGED, ids=[m for _, m in BAD_RAGGED])
def test_pack_ragged_rejects_bad_input(impl, change, match):
    if impl == "native":
        _native("pack_ragged", "cpu")
    inputs = dict(stream=torch.zeros(2, 6, 4), rows=torch.tensor([1]), lengths=torch.tensor([2], dtype=torch.int32),
                  pending=torch.tensor([3], dtype=torch.int32), width=3, queries=torch.zeros(2, 4), capacity=9,
                  visible=7)
    inputs.update(change)
    with pytest.raises(ValueError, match=match):
        pack_ragged(**inputs, backend_name=impl)


BAD_WRITE = [
    (dict(rows=torch.tensor([3])), "rows"),
    (dict(slots=torch.tensor([[0, 9]])), "slot"),
    (dict(slots=torch.tensor([[0]])), "new_keys"),
    (dict(new_values=torch.zeros(1, 2, 2, 4)), "new_values"),
    (dict(keys=torch.zeros(3, 2, 8, 3).transpose(2, 3)), "keys"),
    (dict(new_keys=torch.zeros(1, 2, 2, 3, dtype=torch.float16)), "new_keys"),
]


@pytest.mark.parametrize("impl", ["torch", "native"])
@pytest.mark.parametrize("change,match", BAD_WRITE, ids=[m for _, m in BAD_WRITE])
def test_write_kv_rejects_bad_input_and_writes_nothing(impl, change, match):
    if impl == "native":
        _native("write_kv", "cpu")
    inputs = dict(keys=torch.zeros(3, 2, 8, 3), values=torch.zeros(3, 2, 8, 5), rows=torch.tensor([1]),
                  slots=torch.tensor([[0, 4]]), new_keys=torch.ones(1, 2, 2, 3), new_values=torch.ones(1, 2, 2, 5))
    inputs.update(change)
    with pytest.raises(ValueError, match=match):
        write_kv(**inputs, backend_name=impl)
    assert not inputs["keys"].any() and not inputs["values"].any()
