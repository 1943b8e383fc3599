"""Inputs and checks shared by the contrastive-loss tests."""

import torch

from tests.utils import TOLERANCES, TRITON

NS = [1, 2, 3, 17, 130, 1000]
DS = [1, 3, 64, 200, 1024]
TEMPERATURES = [0.05, 0.1, 0.5, 2.0, -1.0]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def backends(with_triton=True):
    """CPU backends always; the Triton kernels too (under the interpreter on CPU)."""
    out = ["cpu", "reference"]
    if with_triton:
        out.append(TRITON)
    return out


def features(n, d, dtype, device="cpu", scale=1.0):
    """Random rows in dtype (fresh per call), as leaves that require grad."""
    x = torch.randn(n, d, dtype=torch.float64) * scale
    return x.to(device=device, dtype=dtype).requires_grad_()


def as_float64_leaves(*xs):
    return [x.detach().cpu().double().requires_grad_() for x in xs]


def loss_tolerance(dtype, temperature=1.0):
    """(rtol, atol) for a loss and its gradients: low-precision features round
    the logits by ~2^-8 |1/t|."""
    rtol, atol = TOLERANCES[dtype]
    if dtype in (torch.bfloat16, torch.float16):
        k = max(1.0, 1.0 / abs(temperature))
        return rtol * k, atol * k
    return rtol, atol


def natural_grad_scale(temperature, *xs):
    """|d loss / d x| is at most about 1 / (|t| min_i |x_i|): the rounding of a
    gradient that cancels to 0 is measured against that."""
    norm = min(x.detach().double().norm(dim=1).min().item() for x in xs)
    return 1.0 / (abs(temperature) * max(norm, 1e-30))


def assert_loss_and_grads(loss, grads, ref_loss, ref_grads, dtype, temperature=1.0, names=(),
                          grad_scale=0.1):
    rtol, atol = loss_tolerance(dtype, temperature)
    torch.testing.assert_close(loss.detach().cpu().double(), ref_loss.detach(), rtol=rtol, atol=atol)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        name = names[i] if i < len(names) else f"grad {i}"
        assert torch.isfinite(g).all(), name
        # Gradients are O(1/N) per element: compare on the scale of the largest.
        scale = r.abs().max().item() if r.numel() else 1.0
        if r.dim() == 0:  # d loss / d temperature ~ logits / t: rounding of a 0 lands near 1/t^2
            scale = max(scale, 1.0 / temperature**2)
        torch.testing.assert_close(g.detach().cpu().double(), r, rtol=rtol, atol=atol * max(scale, grad_scale),
                                   msg=lambda m, name=name: f"{name}: {m}")


def check_against_reference(loss_fn, reference_fn, leaves, dtype, temperature, names):
    """loss_fn(*leaves) and its gradients equal reference_fn on float64 copies of
    the leaves (the first two are the feature matrices)."""
    loss = loss_fn(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = as_float64_leaves(*leaves)
    ref = reference_fn(*ref_leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    assert_loss_and_grads(loss, grads, ref, ref_grads, dtype, temperature, names,
                          natural_grad_scale(temperature, leaves[0], leaves[1]))
