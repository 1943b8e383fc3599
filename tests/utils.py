"""Shared test helpers: tolerances by dtype, parity assertions, device params."""

import pytest
import torch

# (rtol, atol) for a result stored in the given dtype, against a float64 reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    "tf32": (3e-4, 1e-5),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (1e-2, 1e-3),
}

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def assert_parity(actual, expected, dtype=None, what="result"):
    """actual (any dtype/device) equals the float64 expected within dtype's tolerance."""
    dtype = dtype if dtype is not None else actual.dtype
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.detach().to("cpu", torch.float64),
        expected.detach().to("cpu", torch.float64),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{what} ({dtype}): {m}",
    )


def random_tensor(shape, dtype, device, layout="contiguous"):
    """Random values in the given layout: contiguous, transposed (non-contiguous,
    dense), strided (non-dense: every other element) or channels_last."""
    if layout == "contiguous":
        return torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    if layout == "transposed":
        return random_tensor(tuple(reversed(shape)), dtype, device).transpose(0, -1)
    if layout == "strided":
        big = random_tensor((*shape[:-1], 2 * shape[-1]), dtype, device)
        return big[..., ::2]
    if layout == "channels_last":
        return random_tensor(shape, dtype, device).contiguous(memory_format=torch.channels_last)
    raise ValueError(layout)
