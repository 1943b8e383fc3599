"""InfoNCE with a queue (MoCo v1/v2) and against keys (MoCo v3)."""

import pytest
import torch
import torch.nn.functional as F

import sslfast
from sslfast.functional import info_nce_loss
from sslfast.reference import info_nce_reference
from tests.contrastive_cases import (
    DS,
    DTYPES,
    NS,
    TEMPERATURES,
    backends,
    check_against_reference,
    features,
)
from tests.utils import device_for


def _queue(k, d, dtype, device):
    return F.normalize(torch.randn(k, d, dtype=torch.float64), dim=1).to(device=device, dtype=dtype)


def _check(n, d, temperature, dtype, backend, queue_size=None, m=None, labels=False,
           feature_dim_first=False):
    device = device_for(backend)
    q = features(n, d, dtype, device)
    k = features(m or n, d, dtype, device)
    tau = torch.tensor(temperature, requires_grad=True)
    queue = _queue(queue_size, d, dtype, device) if queue_size else None
    if queue is not None and feature_dim_first:
        queue = queue.t().contiguous()
    lab = torch.randint(0, m or n, (n,), device=device) if labels else None
    ref_queue = None if queue is None else queue.cpu().double()
    ref_labels = None if lab is None else lab.cpu()
    check_against_reference(
        lambda a, b, t: info_nce_loss(a, b, queue, t, lab, backend=backend,
                                      feature_dim_first=feature_dim_first),
        lambda a, b, t: info_nce_reference(a, b, ref_queue, t, ref_labels,
                                           feature_dim_first=feature_dim_first),
        [q, k, tau], dtype, temperature, ["query", "key", "temperature"])


@pytest.mark.parametrize("backend", backends(with_triton=False))
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("d", DS)
def test_queue_shapes(n, d, backend):
    _check(n, d, 0.2, torch.float32, backend, queue_size=257)


@pytest.mark.parametrize("backend", backends(with_triton=False))
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("d", [1, 64, 200])
def test_key_shapes(n, d, backend):
    _check(n, d, 0.2, torch.float32, backend)


@pytest.mark.parametrize("backend", backends(with_triton=False))
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_temperatures_and_dtypes(temperature, dtype, backend):
    _check(17, 64, temperature, dtype, backend, queue_size=100)
    _check(17, 64, temperature, dtype, backend, m=40, labels=True)


def test_feature_dim_first_queue():
    _check(9, 16, 0.07, torch.float32, "cpu", queue_size=33, feature_dim_first=True)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kernels(dtype):
    _check(5, 16, 0.07, dtype, "triton", queue_size=37)
    _check(6, 3, -1.0, dtype, "triton", m=11, labels=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda(dtype):
    _check(256, 128, 0.2, dtype, "triton", queue_size=65536)
    _check(1000, 256, 0.2, dtype, "triton", m=4000, labels=True)


def test_queue_and_key_without_grad():
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.randn(4, 8)  # MoCo keys come from the momentum encoder: no grad
    queue = torch.randn(20, 8, requires_grad=True)
    loss = info_nce_loss(q, k, queue)
    loss.backward()
    assert q.grad is not None and queue.grad is None


def test_module():
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    queue = F.normalize(torch.randn(20, 8), dim=1)
    torch.testing.assert_close(sslfast.InfoNCELoss(0.2)(q, k, queue), info_nce_loss(q, k, queue, 0.2))


def test_bad_input():
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="key has dimension 7 but query has 8"):
        info_nce_loss(q, torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"query has shape \(4, 8\) but key has \(5, 8\)"):
        info_nce_loss(q, torch.randn(5, 8), torch.randn(10, 8))
    with pytest.raises(ValueError, match="queue holds 7-dim rows"):
        info_nce_loss(q, k, torch.randn(10, 7))
    with pytest.raises(ValueError, match="queue is empty"):
        info_nce_loss(q, k, torch.randn(0, 8))
    with pytest.raises(ValueError, match="gather_distributed must be False with a queue"):
        info_nce_loss(q, k, torch.randn(10, 8), gather_distributed=True)
    with pytest.raises(ValueError, match="labels must lie in"):
        info_nce_loss(q, k, labels=torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="labels must be a"):
        info_nce_loss(q, k, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="query is an empty batch"):
        info_nce_loss(torch.randn(0, 8), k)
    with pytest.raises(ValueError, match="Illegal temperature"):
        info_nce_loss(q, k, temperature=0.0)
    with pytest.raises(ValueError, match="query must be 2-D"):
        info_nce_loss(torch.randn(8), k)
