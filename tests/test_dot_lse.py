"""The core op of the contrastive losses: blocked CPU path, registration, memory."""

import pytest
import torch

from sslfast.ops import dot_lse as dot_lse_mod
from sslfast.ops.dot_lse import dot_lse
from sslfast.reference import dot_lse_reference
from tests.utils import assert_parity

CASES = [  # (R, C, D, exclude_offset, with_extra)
    (1, 1, 1, None, False),
    (1, 1, 3, 0, True),
    (3, 5, 3, 0, False),
    (17, 23, 64, 2, True),
    (40, 80, 200, 40, False),
    (20, 17, 1024, -3, True),
]


def _inputs(r, c, d, dtype, with_extra, scale=2.0):
    q = torch.nn.functional.normalize(torch.randn(r, d, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(torch.randn(c, d, dtype=torch.float64), dim=1)
    q, k = q.to(dtype).requires_grad_(), k.to(dtype).requires_grad_()
    s = torch.tensor(scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                     requires_grad=True)
    extra = torch.randn(r, dtype=s.dtype, requires_grad=True) if with_extra else None
    return q, k, s, extra


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_elems", [7, 1 << 22])
def test_cpu_matches_reference(case, dtype, block_elems, monkeypatch):
    monkeypatch.setattr(dot_lse_mod, "_CPU_BLOCK_ELEMS", block_elems)
    r, c, d, off, with_extra = case
    q, k, s, extra = _inputs(r, c, d, dtype, with_extra)
    g = torch.randn(r, dtype=s.dtype)
    lse = dot_lse(q, k, s, off, extra, backend="cpu")
    grads = torch.autograd.grad((lse * g).sum(), [q, k, s] + ([extra] if with_extra else []))
    leaves = [x.detach().double().requires_grad_() for x in [q, k, s] + ([extra] if with_extra else [])]
    ref = dot_lse_reference(leaves[0], leaves[1], leaves[2], off, leaves[3] if with_extra else None)
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), leaves)
    tol_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    assert_parity(lse, ref, tol_dtype, "lse")
    for name, a, b in zip(["dq", "dk", "dscale", "dextra"], grads, ref_grads):
        assert_parity(a.double(), b, dtype if dtype != torch.float64 else dtype, name)


def test_empty_row_is_minus_inf_with_zero_grads():
    q, k, s, _ = _inputs(1, 1, 4, torch.float32, False)
    lse = dot_lse(q, k, s, 0, None, backend="cpu")
    assert lse.item() == float("-inf")
    (gq,) = torch.autograd.grad(lse.clamp_min(-1e9).sum(), [q])
    assert torch.isfinite(gq).all()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend):
    q, k, s, extra = _inputs(5, 7, 3, torch.float32, True)
    torch.library.opcheck(torch.ops.sslfast.dot_lse_forward.default,
                          (q, k, s.detach(), 1, extra.detach(), backend))
    torch.library.opcheck(torch.ops.sslfast.dot_lse_forward.default, (q, k, s, None, None, backend))


def test_compile_fullgraph():
    q, k, s, extra = _inputs(9, 11, 5, torch.float32, True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, s, e):
        return dot_lse(q, k, s, 0, e, backend="cpu").sum()

    out = f(q, k, s, extra)
    out.backward()
    ref = dot_lse_reference(q.double(), k.double(), s.double(), 0, extra.double()).sum()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    assert q.grad is not None and s.grad is not None and extra.grad is not None


def test_cpu_memory_is_blocked():
    """2N = 16384 rows and columns, D = 128: the dense logits alone would be 1 GiB."""
    from sslfast._memory import peak_memory

    n, d = 16384, 128
    z = torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_()
    s = torch.tensor(2.0)

    def step():
        lse = dot_lse(z, z, s, 0, None, backend="cpu")
        lse.mean().backward()
        return lse

    _, peak = peak_memory(step, "cpu")
    if peak is None:
        pytest.skip("the OS cannot reset the RSS peak")
    assert peak < 128 << 20, f"peak {peak / 2**20:.0f} MiB"
    assert torch.isfinite(z.grad).all()
