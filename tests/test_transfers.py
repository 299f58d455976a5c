import pytest
import torch

from memgen import transfers


def _host_tensors(seed: int) -> list[torch.Tensor]:
    """A mix such as the engine sends: int64 rows and (row, item) pairs, int32 counts and lengths, flags, a scalar,
    an empty index, a non-contiguous slice, and odd sizes that misalign whatever follows them."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 100, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g)
    return [
        torch.randint(0, 50, (7,), generator=g, dtype=torch.int32),
        rows,
        torch.rand(3, generator=g) < 0.5,
        torch.randint(0, 9, (5, 2), generator=g),
        torch.tensor(3, dtype=torch.int32),
        torch.zeros(0, dtype=torch.long),
        torch.randint(0, 9, (4, 6), generator=g)[:, ::2],
        torch.rand(3, generator=g, dtype=torch.float64),
        torch.randint(0, 9, (1,), generator=g, dtype=torch.int16),
    ]


@pytest.mark.parametrize("seed", range(5))
def test_tensors_arrive_with_their_values_dtypes_and_shapes_as_views_of_one_copy(seed):
    host = _host_tensors(seed)
    order = torch.randperm(len(host), generator=torch.Generator().manual_seed(seed + 100)).tolist()
    host = [host[i] for i in order]
    out = transfers.to_device(host, "cpu", pin=False)
    assert len(out) == len(host)
    for sent, got in zip(host, out):
        assert got.dtype == sent.dtype and got.shape == sent.shape and got.is_contiguous()
        assert torch.equal(got, sent)
    # one buffer: every result is a view of the same storage (one copy to a device)
    assert len({t.untyped_storage().data_ptr() for t in out}) == 1
    # and none of them shares memory with what was sent: changing the host tensors later changes nothing
    before = [t.clone() for t in out]
    for t in host:
        t.zero_()
    assert all(torch.equal(a, b) for a, b in zip(out, before))


@pytest.mark.parametrize("seed", range(3))
def test_results_come_back_to_the_host_as_views_of_one_copy(seed):
    sent = _host_tensors(seed)
    out = transfers.to_host(sent)
    for want, got in zip(sent, out):
        assert got.device.type == "cpu" and got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
    assert len({t.untyped_storage().data_ptr() for t in out}) == 1


def test_nothing_and_one_tensor():
    assert transfers.to_device([], "cpu", pin=False) == [] and transfers.to_host([]) == []
    one = torch.arange(5)
    got, = transfers.to_device([one], "cpu", pin=False)
    assert torch.equal(got, one) and got.data_ptr() != one.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("seed", range(3))
def test_tensors_arrive_on_cuda_from_pinned_memory_and_come_back(seed):
    host = _host_tensors(seed)
    out = transfers.to_device(host, "cuda")
    for sent, got in zip(host, out):
        assert got.device.type == "cuda" and got.dtype == sent.dtype and got.shape == sent.shape
        assert torch.equal(got.cpu(), sent)
    back = transfers.to_host(out)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(back, host))
