"""The core op of the contrastive losses: blocked CPU path, registration, memory."""

import pytest
import torch

from sslfast.ops import dot_lse as dot_lse_mod
from sslfast.ops.dot_lse import dot_lse
from sslfast.reference import dot_lse_reference
from tests.utils import TRITON, assert_parity, device_for

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


def _reference(q, k, s, off, extra):
    leaves = [x.detach().double().requires_grad_() for x in (q, k, s)]
    e = extra.detach().double().requires_grad_() if extra is not None else None
    lse = dot_lse_reference(*leaves, off, e)
    return lse, leaves + ([e] if e is not None else [])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_elems", [7, 1 << 22])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_mean_matches_reference(case, dtype, block_elems, backend, monkeypatch):
    """mean_i lse_i and its gradients (eager on the CPU backend)."""
    monkeypatch.setattr(dot_lse_mod, "_CPU_BLOCK_ELEMS", block_elems)
    r, c, d, off, with_extra = case
    q, k, s, extra = _inputs(r, c, d, dtype, with_extra)
    g = float(torch.randn(()))
    inputs = [q, k, s] + ([extra] if with_extra else [])
    mean = dot_lse(q, k, s, off, extra, backend=backend)
    grads = torch.autograd.grad(mean * g, inputs)
    ref, leaves = _reference(q, k, s, off, extra)
    ref_grads = torch.autograd.grad(ref.mean() * g, leaves)
    tol_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    assert_parity(mean, ref.mean(), tol_dtype, "mean lse")
    for name, a, b in zip(["dq", "dk", "dscale", "dextra"], grads, ref_grads):
        assert_parity(a.double(), b, dtype, name)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("block_elems", [7, 1 << 22])
def test_backward_with_any_row_weights(case, backend, block_elems, monkeypatch):
    """The recomputing backward takes one upstream gradient per row."""
    monkeypatch.setattr(dot_lse_mod, "_CPU_BLOCK_ELEMS", block_elems)
    r, c, d, off, with_extra = case
    q, k, s, extra = _inputs(r, c, d, torch.float32, with_extra)
    ref, leaves = _reference(q, k, s, off, extra)
    g = torch.randn(r, dtype=torch.float64)
    ref_grads = torch.autograd.grad((ref * g).sum(), leaves[:3])
    dq, dk, ds = torch.ops.sslfast.dot_lse_backward(q.detach(), k.detach(), s.detach(),
                                                    ref.detach().float(), g.float(), off, True,
                                                    True, backend)
    for name, a, b in zip(["dq", "dk", "dscale"], (dq, dk, ds), ref_grads):
        assert_parity(a.double(), b, torch.float32, name)


@pytest.mark.parametrize("block_elems", [1, 7, 100, 1 << 22])
@pytest.mark.parametrize("n, exclude_offset, scale", [
    (1, None, 2.0), (2, 0, 2.0), (9, 0, -3.0), (40, 0, 20.0), (33, None, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_symmetric_cpu_path(n, exclude_offset, scale, dtype, block_elems, monkeypatch):
    """NT-Xent on one process on the CPU (q is k): only the blocks on and right of the
    diagonal are computed, each block folding into its rows' and its columns' running
    max/sum; values and gradients (z, scale) equal the reference for any block size."""
    monkeypatch.setattr(dot_lse_mod, "_CPU_BLOCK_ELEMS", block_elems)
    z, _, s, _ = _inputs(n, 1, 6, dtype, False, scale)
    out = dot_lse(z, z, s, exclude_offset, None, backend="cpu")
    grads = torch.autograd.grad(out, [z, s])
    leaves = [t.detach().double().requires_grad_() for t in (z, s)]
    ref = dot_lse_reference(leaves[0], leaves[0], leaves[1], exclude_offset).mean()
    ref_grads = torch.autograd.grad(ref, leaves)
    assert_parity(out, ref, dtype, "lse mean")
    for name, a, b in zip(["dz", "dscale"], grads, ref_grads):
        assert_parity(a.double(), b, dtype, name)
    blocks = list(dot_lse_mod._triangle_blocks(n))
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert all((r1 - r0) * (n - r0) <= max(block_elems, n - r0) for r0, r1 in blocks)


@pytest.mark.parametrize("dtype, scale, one_exp_range, one_exp", [
    (torch.float32, 5.0, None, True),   # logits within 2|s| = 10 of each other: one exp
    (torch.float64, 100.0, 50.0, False),  # spread up to 200 > 50: rows and columns alone
    (torch.float32, 5.0, float("-inf"), False),  # the two-exponential path forced
], ids=["fp32-one-exp", "fp64-wide-spread", "fp32-forced-two-exp"])
def test_symmetric_cpu_one_exponential(dtype, scale, one_exp_range, one_exp, monkeypatch):
    """Blocks whose entries lie within _ONE_EXP_RANGE of each other take one
    exponential per logit for rows and columns; the others fall back to each row's
    and column's own maximum. Both equal the reference."""
    monkeypatch.setattr(dot_lse_mod, "_CPU_BLOCK_ELEMS", 300)
    if one_exp_range is not None:
        monkeypatch.setitem(dot_lse_mod._ONE_EXP_RANGE, dtype, one_exp_range)
    calls = []
    online = dot_lse_mod._online_update
    monkeypatch.setattr(dot_lse_mod, "_online_update",
                        lambda *a: calls.append(1) or online(*a))
    z, _, s, _ = _inputs(60, 1, 8, dtype, False, scale)
    out = dot_lse(z, z, s, 0, None, backend="cpu")
    grads = torch.autograd.grad(out, [z, s])
    assert (not calls) == one_exp
    leaves = [t.detach().double().requires_grad_() for t in (z, s)]
    ref = dot_lse_reference(leaves[0], leaves[0], leaves[1], 0).mean()
    assert_parity(out, ref, dtype, "lse mean")
    for name, a, b in zip(["dz", "dscale"], grads, torch.autograd.grad(ref, leaves)):
        assert_parity(a.double(), b, dtype, name)


def test_symmetric_cpu_forward_only():
    # Without gradients only the log-sum-exp pass runs: per-row lse equals the reference.
    z, _, s, _ = _inputs(50, 1, 8, torch.float32, False, 5.0)
    with torch.no_grad():
        lse = torch.ops.sslfast.dot_lse_mean(z, z, s, 0, None, "cpu", False, False, False,
                                             True)[1]
    ref = dot_lse_reference(z.double(), z.double(), s.double(), 0)
    assert_parity(lse.double(), ref, torch.float32, "lse")


def test_empty_row_is_minus_inf_with_zero_grads():
    q, k, s, _ = _inputs(1, 1, 4, torch.float32, False)
    lse = dot_lse(q, k, s, 0, None, backend="cpu")
    assert lse.item() == float("-inf")
    (gq,) = torch.autograd.grad(lse.clamp_min(-1e9), [q], allow_unused=True)
    assert gq is None or torch.isfinite(gq).all()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend):
    q, k, s, extra = _inputs(5, 7, 3, torch.float32, True)
    op = torch.ops.sslfast.dot_lse_mean.default
    torch.library.opcheck(op, (q, k, s.detach(), 1, extra.detach(), backend, True, True, False, False))
    torch.library.opcheck(op, (q, k, s, None, None, backend, True, False, True, False))
    z = torch.randn(6, 3, requires_grad=True)
    torch.library.opcheck(op, (z, z, s, 0, None, backend, True, True, True, True))
    torch.library.opcheck(op, (q.detach(), k.detach(), s.detach(), 0, None, backend, False, False, False, False))
    lse = torch.randn(5)
    torch.library.opcheck(torch.ops.sslfast.dot_lse_backward.default,
                          (q.detach(), k.detach(), s.detach(), lse, torch.randn(5), 1, True, False, backend))


@pytest.mark.parametrize("backend", ["cpu", "reference", TRITON])
def test_pair_opcheck_and_parity(backend):
    """CLIP's two directions over one logit matrix."""
    device = device_for(backend)
    x, y, s, _ = _inputs(6, 6, 5, torch.float32, False)
    x, y, s = (t.detach().to(device).requires_grad_() for t in (x, y, s))
    op = torch.ops.sslfast.dot_lse_pair_mean.default
    torch.library.opcheck(op, (x, y, s, backend, True, True, True))
    torch.library.opcheck(op, (x.detach(), y, s.detach(), backend, False, True, False))
    lse_x, lse_y, g_x, g_y = (torch.randn(6, device=device) for _ in range(4))
    for need_dy in (True, False):
        torch.library.opcheck(torch.ops.sslfast.dot_lse_pair_backward.default,
                              (x.detach(), y.detach(), s.detach(), lse_x, lse_y, g_x, g_y,
                               backend, need_dy))
    from sslfast.ops.dot_lse import dot_lse_pair

    out = dot_lse_pair(x, y, s, backend)
    grads = torch.autograd.grad(out, [x, y, s])
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, y, s)]
    ref = (dot_lse_reference(leaves[0], leaves[1], leaves[2]).mean()
           + dot_lse_reference(leaves[1], leaves[0], leaves[2]).mean())
    ref_grads = torch.autograd.grad(ref, leaves)
    assert_parity(out, ref, torch.float32, "pair")
    for name, a, b in zip(["dx", "dy", "dscale"], grads, ref_grads):
        assert_parity(a.double(), b, torch.float32, name)


def test_compile_fullgraph():
    q, k, s, extra = _inputs(9, 11, 5, torch.float32, True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, s, e):
        return dot_lse(q, k, s, 0, e, backend="cpu")

    out = f(q, k, s, extra)
    out.backward()
    ref = dot_lse_reference(q.double(), k.double(), s.double(), 0, extra.double()).mean()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    assert q.grad is not None and s.grad is not None and extra.grad is not None


def test_cpu_memory_is_blocked():
    """2N = 16384 rows and columns, D = 128: the dense logits alone would be 1 GiB."""
    from sslfast._memory import peak_memory

    n, d = 16384, 128
    z = torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_()
    s = torch.tensor(2.0)

    def step():
        mean = dot_lse(z, z, s, 0, None, backend="cpu")
        mean.backward()
        return mean

    step()  # first use: the BLAS library's own buffers, the OpenMP pool
    z.grad = None
    _, peak = peak_memory(step, "cpu")
    if peak is None:
        pytest.skip("the OS cannot reset the RSS peak")
    # Resident-set growth, so it includes allocator slack: far below the 1 GiB of
    # dense logits is the claim (inputs and gradients alone are 8 MiB each).
    assert peak < 256 << 20, f"peak {peak / 2**20:.0f} MiB"
    assert torch.isfinite(z.grad).all()
