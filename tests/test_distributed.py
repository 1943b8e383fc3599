"""gather_distributed with 2 and 3 gloo processes on the CPU equals one process
on the concatenated batch (loss: the mean of the ranks' losses; gradients: the
gather's backward sums over ranks, so each rank holds W x the global gradient
of its own rows, which DDP's averaging turns back into the global one)."""

import pytest
import torch

from sslfast import distributed
from sslfast.functional import clip_loss, info_nce_loss, ntxent_loss
from tests.utils import spawn_gloo

N, D = 5, 12  # rows per rank


def _global_inputs(world):
    g = torch.Generator().manual_seed(1234)
    return [torch.randn(world * N, D, generator=g, dtype=torch.float64) for _ in range(2)]


def _losses(a, b, gather):
    return {
        "ntxent": lambda x, y: ntxent_loss(x, y, 0.3, gather_distributed=gather),
        "info_nce": lambda x, y: info_nce_loss(x, y, None, 0.2, gather_distributed=gather),
        "clip": lambda x, y: clip_loss(x, y, 7.0, gather_distributed=gather),
    }


def _worker(rank, world):
    assert distributed.rank() == rank and distributed.world_size() == world
    a_all, b_all = _global_inputs(world)
    results = {}
    for name, fn in _losses(None, None, True).items():
        a = a_all[rank * N:(rank + 1) * N].clone().requires_grad_()
        b = b_all[rank * N:(rank + 1) * N].clone().requires_grad_()
        loss = fn(a, b)
        ga, gb = torch.autograd.grad(loss, [a, b])
        results[name] = (loss.detach(), ga, gb)
    results["gather_no_grad"] = distributed.gather_no_grad(torch.full((2,), float(rank)))
    x = torch.ones(N, D, dtype=torch.bfloat16, requires_grad=True)
    (distributed.gather(x) * BF16_ADDENDS[rank]).sum().backward()
    results["bf16_grad"] = x.grad
    # The gradient autograd hands the backward is read, never written; any layout.
    x = torch.randn(N, D, dtype=torch.float64).t().requires_grad_()  # non-contiguous
    grad = torch.arange(world * D * N, dtype=torch.float64).view(N, world * D).t()  # too
    kept = grad.clone()
    distributed.gather(x).backward(grad)
    results["grad_kept"] = torch.equal(grad, kept)
    results["grad_rows"] = x.grad
    images = torch.full((2, 3, 4, 5), float(rank)).contiguous(memory_format=torch.channels_last)
    results["images"] = distributed.gather_no_grad(images)
    return results


# Each rank's gradient for every gathered row: summed in bf16, 1 + 2^-8 rounds back to
# 1 (a tie, to even) and so does the next + 2^-8; summed in fp32 they make 1 + 2^-7.
BF16_ADDENDS = [1.0, 2.0**-8, 2.0**-8]


@pytest.mark.parametrize("world", [2, 3])
def test_gather_distributed_equals_one_process(world, tmp_path):
    per_rank = spawn_gloo(_worker, world, tmp_path)
    a_all, b_all = _global_inputs(world)
    for name, fn in _losses(None, None, False).items():
        a, b = a_all.clone().requires_grad_(), b_all.clone().requires_grad_()
        loss = fn(a, b)
        ga, gb = torch.autograd.grad(loss, [a, b])
        mean_loss = sum(res[name][0] for res in per_rank) / world
        torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-12, atol=1e-12, msg=name)
        for r, res in enumerate(per_rank):
            rows = slice(r * N, (r + 1) * N)
            torch.testing.assert_close(res[name][1], world * ga[rows], rtol=1e-10, atol=1e-12, msg=name)
            torch.testing.assert_close(res[name][2], world * gb[rows], rtol=1e-10, atol=1e-12, msg=name)
    expected = torch.arange(world, dtype=torch.float32).repeat_interleave(2)
    bf16_sum = torch.tensor(sum(BF16_ADDENDS[:world]), dtype=torch.float32).to(torch.bfloat16)
    for res in per_rank:
        assert torch.equal(res["gather_no_grad"], expected)
        assert res["bf16_grad"].dtype == torch.bfloat16
        assert torch.equal(res["bf16_grad"], torch.full((N, D), bf16_sum.item(),
                                                        dtype=torch.bfloat16))
    grad = torch.arange(world * D * N, dtype=torch.float64).view(N, world * D).t()
    for r, res in enumerate(per_rank):
        assert res["grad_kept"]
        torch.testing.assert_close(res["grad_rows"], world * grad[r * D:(r + 1) * D],
                                   rtol=0, atol=0)
        assert torch.equal(res["images"], torch.arange(world, dtype=torch.float32)
                           .repeat_interleave(2).view(-1, 1, 1, 1).expand(-1, 3, 4, 5))


def test_single_process_helpers_are_identity():
    x = torch.randn(3, 4, requires_grad=True)
    assert distributed.gather(x) is x
    assert distributed.rank() == 0 and distributed.world_size() == 1


def _uneven_worker(rank, world):
    with pytest.raises(ValueError, match=r"same shape .*rank 0: \(4, 3\); rank 1: \(5, 3\)"):
        distributed.gather(torch.ones(4 + rank, 3, requires_grad=True))
    with pytest.raises(ValueError, match=r"rank 0: \(2, 3, 4\); rank 1: \(2, 4, 4\)"):
        distributed.gather_no_grad(torch.ones(2, 3 + rank, 4))
    return distributed.gather(torch.full((2, 3), float(rank))).shape  # still paired after


def test_unequal_shapes_across_ranks_are_a_clear_error_on_every_rank(tmp_path):
    assert spawn_gloo(_uneven_worker, 2, tmp_path) == [(4, 3), (4, 3)]


def test_device_tensors_are_checked_at_their_first_gather_only(monkeypatch):
    """The check waits for the device: once per process for device tensors, at every
    gather for CPU tensors (the fake collective reports equal shapes)."""
    calls = []

    def fake_gather(t):
        calls.append(t.device.type)
        return torch.zeros(2 * len(t), dtype=torch.int64)

    monkeypatch.setattr(distributed, "_GATHERS", {})
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "_gather_into", fake_gather)
    for x in [torch.empty(4, 3, device="meta")] * 3 + [torch.empty(4, 3)] * 2:
        distributed._check_same_shape(x)
    assert calls == ["meta", "cpu", "cpu"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_backward_hands_the_collective_contiguous_tensors(monkeypatch, dtype):
    """NCCL refuses non-contiguous tensors; a gradient reaching gather's backward may be
    a transposed or expanded view (gloo accepts those, so the gloo test cannot tell)."""
    seen = []

    def fake_reduce_scatter(out, inp):
        seen.append((out.is_contiguous(), inp.is_contiguous(), inp.dtype))
        out.copy_(inp[:len(out)])

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        monkeypatch.setattr(distributed.dist, name, fake_reduce_scatter, raising=False)
    for grad in (torch.randn(3, 4).t().to(dtype), torch.ones(1, 3).to(dtype).expand(4, 3)):
        mine = distributed._GatherWithGrad.backward(None, grad)
        assert torch.equal(mine, grad[:2]) and mine.dtype == dtype
    assert seen == [(True, True, torch.float32)] * 2
