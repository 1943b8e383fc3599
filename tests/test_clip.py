"""CLIP loss (open_clip ClipLoss semantics)."""

import pytest
import torch

import sslfast
from sslfast.functional import clip_loss
from sslfast.reference import clip_reference
from tests.contrastive_cases import (
    DS,
    DTYPES,
    NS,
    as_float64_leaves,
    backends,
    check_against_reference,
    features,
)
from tests.utils import device_for


def _check(n, d, scale, dtype, backend):
    device = device_for(backend)
    leaves = [features(n, d, dtype, device), features(n, d, dtype, device),
              torch.tensor(scale, requires_grad=True)]
    check_against_reference(lambda x, y, s: clip_loss(x, y, s, backend=backend), clip_reference,
                            leaves, dtype, 1.0 / scale,
                            ["image_features", "text_features", "logit_scale"])


@pytest.mark.parametrize("backend", backends(with_triton=False))
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("d", DS)
def test_shapes(n, d, backend):
    _check(n, d, 14.3, torch.float32, backend)


@pytest.mark.parametrize("backend", backends(with_triton=False))
@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0, -1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scales_and_dtypes(scale, dtype, backend):
    _check(17, 64, scale, dtype, backend)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kernels(dtype):
    _check(7, 16, 10.0, dtype, "triton")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda(dtype):
    _check(4096, 512, 100.0, dtype, "triton")


def test_module_and_open_clip_form():
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    logit_scale = torch.nn.Parameter(torch.tensor(2.659))  # log(1/0.07)
    loss = sslfast.CLIPLoss()(x, y, logit_scale.exp())
    loss.backward()
    assert logit_scale.grad is not None
    torch.testing.assert_close(loss, clip_reference(x, y, logit_scale.exp()).detach())


def test_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="image_features has shape"):
        clip_loss(x, torch.randn(3, 8), 1.0)
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        clip_loss(x, x, float("inf"))
    with pytest.raises(TypeError, match="text_features must be a floating-point"):
        clip_loss(x, torch.ones(4, 8, dtype=torch.int32), 1.0)


def test_compile_fullgraph():
    x, y = features(6, 8, torch.float32), features(6, 8, torch.float32)
    s = torch.tensor(5.0, requires_grad=True)
    f = torch.compile(lambda x, y, s: clip_loss(x, y, s, backend="cpu"), fullgraph=True,
                      backend="aot_eager")
    loss = f(x, y, s)
    loss.backward()
    ref = clip_reference(*as_float64_leaves(x, y, s))
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert x.grad is not None and s.grad is not None
