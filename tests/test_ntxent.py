"""NT-Xent (sslfast.functional.ntxent_loss / sslfast.NTXentLoss)."""

import pytest
import torch

import sslfast
from sslfast.functional import ntxent_loss
from sslfast.reference import ntxent_reference
from tests.contrastive_cases import (
    DS,
    DTYPES,
    NS,
    TEMPERATURES,
    as_float64_leaves,
    backends,
    check_against_reference,
    features,
)
from tests.utils import device_for


def _check(n, d, temperature, dtype, backend, tau_tensor=False, scale=1.0):
    device = device_for(backend)
    leaves = [features(n, d, dtype, device, scale), features(n, d, dtype, device, scale)]
    if tau_tensor:
        leaves.append(torch.tensor(temperature, requires_grad=True))

    def loss_fn(a, b, *tau):
        return ntxent_loss(a, b, tau[0] if tau else temperature, backend=backend)

    def reference_fn(a, b, *tau):
        return ntxent_reference(a, b, tau[0] if tau else temperature)

    check_against_reference(loss_fn, reference_fn, leaves, dtype, temperature,
                            ["out0", "out1", "temperature"])


@pytest.mark.parametrize("backend", backends(with_triton=False))
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("d", DS)
def test_shapes(n, d, backend):
    _check(n, d, 0.5, torch.float32, backend)


@pytest.mark.parametrize("backend", backends(with_triton=False))
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_temperatures_and_dtypes(temperature, dtype, backend):
    _check(17, 64, temperature, dtype, backend, tau_tensor=True)


@pytest.mark.triton
@pytest.mark.parametrize("case", [(1, 1, 0.5), (3, 3, -1.0), (17, 64, 0.05), (5, 200, 2.0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kernels(case, dtype):
    n, d, t = case
    _check(n, d, t, dtype, "triton", tau_tensor=True)


@pytest.mark.cuda
@pytest.mark.parametrize("n,d", [(1000, 128), (4096, 256), (130, 1024)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda(n, d, dtype):
    _check(n, d, 0.1, dtype, "triton", tau_tensor=True)


@pytest.mark.parametrize("n,d", [(1, 4), (17, 64), (130, 128)])
@pytest.mark.parametrize("temperature", [0.1, 0.5, -1.0])
def test_equals_lightly(n, d, temperature):
    lightly_loss = pytest.importorskip("lightly.loss")
    a, b = features(n, d, torch.float32), features(n, d, torch.float32)
    ours = sslfast.NTXentLoss(temperature)(a, b)
    g = torch.autograd.grad(ours, [a, b])
    theirs = lightly_loss.NTXentLoss(temperature)(a, b)
    h = torch.autograd.grad(theirs, [a, b])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for x, y in zip(g, h):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", backends())
def test_stability(backend):
    device = device_for(backend)
    n, d = 9, 32
    # Huge norms.
    a, b = features(n, d, torch.float32, device, 1e18), features(n, d, torch.float32, device, 1e18)
    loss = ntxent_loss(a, b, 0.1, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()
    # Near-duplicate rows at a small temperature.
    base = torch.randn(1, d).repeat(n, 1)
    a = (base + 1e-6 * torch.randn(n, d)).to(device).requires_grad_()
    b = (base + 1e-6 * torch.randn(n, d)).to(device).requires_grad_()
    loss = ntxent_loss(a, b, 0.01, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()
    # All-zero rows.
    a = torch.zeros(n, d, device=device, requires_grad=True)
    b = torch.zeros(n, d, device=device, requires_grad=True)
    loss = ntxent_loss(a, b, 0.5, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()
    torch.testing.assert_close(loss.cpu(), torch.tensor(2 * n - 1.0).log())


def test_inputs_are_not_modified():
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    a0, b0 = a.clone(), b.clone()
    ntxent_loss(a, b)
    assert torch.equal(a, a0) and torch.equal(b, b0)


def test_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"out0 has shape \(4, 8\) but out1 has \(5, 8\)"):
        ntxent_loss(x, torch.randn(5, 8))
    with pytest.raises(ValueError, match="out0 must be 2-D"):
        ntxent_loss(torch.randn(8), torch.randn(8))
    with pytest.raises(ValueError, match="out0 is an empty batch"):
        ntxent_loss(torch.randn(0, 8), torch.randn(0, 8))
    with pytest.raises(TypeError, match="out0 must be a floating-point"):
        ntxent_loss(torch.ones(4, 8, dtype=torch.int64), x)
    with pytest.raises(TypeError, match="out1 is torch.float64 but out0 is torch.float32"):
        ntxent_loss(x, x.double())
    with pytest.raises(ValueError, match="out1 is on meta but out0 is on cpu"):
        ntxent_loss(x, torch.empty(4, 8, device="meta"))
    for bad in (0.0, 1e-9, torch.tensor(0.0)):
        with pytest.raises(ValueError, match="Illegal temperature"):
            ntxent_loss(x, x, bad)
    with pytest.raises(ValueError, match="temperature must be finite"):
        ntxent_loss(x, x, float("nan"))
    with pytest.raises(ValueError, match="temperature must be a float or a 0-dim"):
        ntxent_loss(x, x, torch.tensor([0.5]))
    with pytest.raises(TypeError, match="temperature must be a float"):
        ntxent_loss(x, x, "0.5")
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="out1 contains NaN or Inf"):
        ntxent_loss(x, bad)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="out0 contains NaN or Inf"):
        ntxent_loss(bad, x)
    with pytest.raises(ValueError, match="Illegal temperature"):
        sslfast.NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="illegal memory bank size"):
        sslfast.NTXentLoss(memory_bank_size=(4096, 128, 1))
    with pytest.raises(ValueError, match="backend must be one of"):
        ntxent_loss(x, x, backend="fast")


def test_compile_fullgraph():
    a, b = features(6, 8, torch.float32), features(6, 8, torch.float32)
    f = torch.compile(lambda a, b: ntxent_loss(a, b, 0.3, backend="cpu"), fullgraph=True,
                      backend="aot_eager")
    loss = f(a, b)
    loss.backward()
    ref = ntxent_reference(*as_float64_leaves(a, b), 0.3)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
