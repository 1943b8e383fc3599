"""Triton dot-product log-sum-exp kernels (sslfast.kernels.dot_lse) against a dense
float64 reference: values and gradients, odd shapes, exclusions, extra logits, configs."""

import pytest
import torch

pytest.importorskip("triton")

from sslfast.bench import harness  # noqa: E402
from sslfast.kernels import dot_lse  # noqa: E402
from sslfast.kernels.dot_lse import dot_lse_backward, dot_lse_forward  # noqa: E402
from tests.utils import TRITON_DEVICE as DEVICE  # noqa: E402

# The interpreter's numpy warns on exp2 overflow / log2(0) in lanes that where() discards.
pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
# Relative tolerances (of each tensor's magnitude) for (lse, gradients).
TOL = {
    torch.float32: (1e-5, 1e-5),
    # Low-precision products are exact in fp32, so lse is accurate; gradients use p cast
    # to bf16/fp16 as the dot operand (like flash attention).
    torch.bfloat16: (1e-4, 1e-2),
    torch.float16: (1e-4, 1e-2),
}
# fp32 inputs under TF32 (torch's fp32 matmul precision "tf32"): the dots read 10 of the
# 23 mantissa bits (the interpreter truncates, the worst case), so the logits themselves
# carry a relative error up to 2^-9: at |scale| = 20 about 1e-3 of max|lse|.
TF32_TOL = (3e-3, 1e-2)
SMALL_CONFIG = {"BLOCK_R": 16, "BLOCK_C": 16, "BLOCK_D": 16, "num_warps": 4, "num_stages": 1}
WIDE_CONFIG = {"BLOCK_R": 32, "BLOCK_C": 64, "BLOCK_D": 64, "num_warps": 4, "num_stages": 2}


# ----------------------------------------------------------------------------- reference


def _exclusion_mask(R, C, exclude_offset, device):
    mask = torch.zeros(R, C, dtype=torch.bool, device=device)
    if exclude_offset is not None:
        i = torch.arange(R, device=device)
        j = i + exclude_offset
        ok = (j >= 0) & (j < C)
        mask[i[ok], j[ok]] = True
    return mask


def _max(t):
    return t.max() if t.numel() else torch.zeros((), dtype=t.dtype)


def reference(q, k, scale, exclude_offset, extra, g):
    """Dense float64: lse, dq, dk, dscale (autograd of sum(g * lse)) and, for tolerances,
    the magnitudes of the terms summed into each gradient (no cancellation)."""
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    s64 = scale.detach().double().requires_grad_()
    R, C = q.shape[0], k.shape[0]
    qk = q64 @ k64.T
    logits = (s64 * qk).masked_fill(_exclusion_mask(R, C, exclude_offset, q.device), float("-inf"))
    if extra is not None:
        logits = torch.cat([logits, extra.double()[:, None]], 1)
    lse = torch.logsumexp(logits, 1)
    dq, dk, dscale = torch.autograd.grad((g.double() * lse).sum(), [q64, k64, s64])
    with torch.no_grad():
        gp = g.double().abs()[:, None] * torch.exp(logits[:, :C] - lse[:, None])
        mags = (
            _max(lse.abs()),
            _max(s64.abs() * gp @ k64.abs()),
            _max(s64.abs() * gp.T @ q64.abs()),
            (gp * qk.abs()).sum(),
        )
    return (lse.detach(), dq, dk, dscale), mags


def assert_rel(actual, expected, rtol, magnitude, what):
    atol = rtol * max(float(magnitude), 1e-30)
    torch.testing.assert_close(
        actual.detach().to("cpu", torch.float64), expected.detach().to("cpu", torch.float64),
        rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}",
    )


def make_inputs(R, C, D, dtype, device, norm=1.0, extra=False):
    """Rows of norm `norm` (contrastive embeddings are L2-normalized), rounded to dtype."""
    q = torch.nn.functional.normalize(torch.randn(R, D, dtype=torch.float64), dim=1) * norm
    k = torch.nn.functional.normalize(torch.randn(C, D, dtype=torch.float64), dim=1) * norm
    ex = torch.randn(R, dtype=torch.float32, device=device) * 3 if extra else None
    g = torch.randn(R, dtype=torch.float32, device=device)
    return q.to(device, dtype), k.to(device, dtype), ex, g


def check(R, C, D, dtype, device, exclude_offset, extra, scale, config=None, norm=1.0,
          grad_rtol=None):
    q, k, ex, g = make_inputs(R, C, D, dtype, device, norm, extra)
    scale_t = torch.tensor(float(scale), dtype=torch.float32, device=device)
    lse = dot_lse_forward(q, k, scale_t, exclude_offset, ex, config=config)
    dq, dk, dscale = dot_lse_backward(q, k, scale_t, lse, g, exclude_offset, config=config)
    assert lse.shape == (R,) and lse.dtype == torch.float32
    assert dq.shape == (R, D) and dq.dtype == torch.float32
    assert dk.shape == (C, D) and dk.dtype == torch.float32
    assert dscale.shape == () and dscale.dtype == torch.float32
    for t in (dq, dk, dscale):
        assert torch.isfinite(t).all()
    (r_lse, r_dq, r_dk, r_ds), mags = reference(q, k, scale_t, exclude_offset, ex, g)
    use_tf32 = dtype == torch.float32 and not dot_lse._ieee(dtype)
    lse_rtol, g_rtol = TF32_TOL if use_tf32 else TOL[dtype]
    g_rtol = grad_rtol or g_rtol
    assert_rel(lse, r_lse, lse_rtol, mags[0], "lse")
    assert_rel(dq, r_dq, g_rtol, mags[1], "dq")
    assert_rel(dk, r_dk, g_rtol, mags[2], "dk")
    assert_rel(dscale, r_ds, g_rtol, mags[3], "dscale")
    return lse, dq, dk, dscale


# ----------------------------------------------------------------------------- tests

# (R, C, D, exclude_offset, extra, scale): odd sizes, D below/across/beyond BLOCK_D.
CASES = [
    (1, 1, 1, None, False, 20.0),
    (1, 2, 3, None, True, -1.0),
    (3, 5, 3, 0, False, 20.0),
    (17, 23, 64, 0, True, -1.0),
    (33, 40, 200, 5, True, 20.0),
    (20, 17, 1024, None, False, 20.0),
    (6, 24, 64, 12, False, 20.0),  # NT-Xent, W=4: 2N=6 local rows vs 24 gathered, rank 2
    (17, 20, 16, 10, True, 20.0),  # rows 10.. exclude columns >= C: out of range
    (17, 20, 16, -5, False, -1.0),  # rows 0..4 exclude negative columns: out of range
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "R{}-C{}-D{}-off{}-ex{}-s{}".format(*c))
def test_parity(case, dtype):
    R, C, D, off, extra, scale = case
    check(R, C, D, dtype, DEVICE, off, extra, scale)


@pytest.mark.parametrize("case", CASES[2:], ids=lambda c: "R{}-C{}-D{}-off{}-ex{}-s{}".format(*c))
def test_parity_tf32(case, tf32):
    # fp32 inputs on TF32 tensor cores where torch's fp32 matmuls would use them: within
    # TF32's tolerance, and not the IEEE result (the flag is followed, not ignored).
    R, C, D, off, extra, scale = case
    torch.manual_seed(1)
    lse, dq, dk, _ = check(R, C, D, torch.float32, DEVICE, off, extra, scale)
    torch.manual_seed(1)  # the same inputs again (check draws them first)
    q, k, ex, g = make_inputs(R, C, D, torch.float32, DEVICE, 1.0, extra)
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    scale_t = torch.tensor(float(scale), device=DEVICE)
    ieee = dot_lse_forward(q, k, scale_t, off, ex)
    assert not torch.equal(lse, ieee)
    # the backward's dots too: from the TF32 lse, only the precision differs
    dq_ieee, dk_ieee, _ = dot_lse_backward(q, k, scale_t, lse, g, off)
    assert not torch.equal(dq, dq_ieee) and not torch.equal(dk, dk_ieee)
    for a, b in ((dq, dq_ieee), (dk, dk_ieee)):  # the same inputs: close (the TF32 lse
        # against IEEE logits leaves p off by up to |scale| 2^-9 of its size)
        torch.testing.assert_close(a, b, rtol=0, atol=0.05 * b.abs().max().item())


def test_tf32_follows_torch(tf32):
    # Every way torch sets its fp32 matmul precision reaches the kernels' flag.
    with harness.fp32_precision("tf32"):
        for setting, ieee in (("ieee", True), ("tf32", False), ("none", True)):
            torch.backends.cuda.matmul.fp32_precision = setting
            assert dot_lse._ieee(torch.float32) is ieee
        torch.set_float32_matmul_precision("high")
        assert not dot_lse._ieee(torch.float32)
        torch.set_float32_matmul_precision("highest")
        assert dot_lse._ieee(torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_large_magnitudes(dtype):
    # Logits up to |20 * 10 * 10| = 2000: the online max must keep exp from overflowing.
    # fp32 logits then carry ~eps * 2000 absolute error, so gradients get a looser bound.
    lse, *_ = check(19, 21, 5, dtype, DEVICE, 0, True, 20.0, norm=10.0, grad_rtol=1e-3
                    if dtype == torch.float32 else 2e-2)
    assert lse.abs().max() > 500


def test_empty_row_alone():
    q, k, _, _ = make_inputs(1, 1, 3, torch.float32, DEVICE)
    scale = torch.tensor(20.0, device=DEVICE)
    lse = dot_lse_forward(q, k, scale, 0)
    assert lse.item() == float("-inf")
    dq, dk, dscale = dot_lse_backward(q, k, scale, lse, torch.ones(1, device=DEVICE), 0)
    assert torch.equal(dq, torch.zeros_like(dq))
    assert torch.equal(dk, torch.zeros_like(dk))
    assert dscale.item() == 0.0
    # With an extra logit the set is {extra}: lse = extra, still no q/k gradient.
    extra = torch.tensor([1.25], device=DEVICE)
    lse = dot_lse_forward(q, k, scale, 0, extra)
    assert lse.item() == pytest.approx(1.25, rel=1e-6)
    dq, dk, dscale = dot_lse_backward(q, k, scale, lse, torch.ones(1, device=DEVICE), 0)
    assert dq.abs().max() == 0 and dk.abs().max() == 0 and dscale.item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_empty_row_among_others(dtype):
    # C = 1 and offset -1: row 1 excludes the only column; rows 0 and 2 exclude nothing.
    q, k, _, g = make_inputs(3, 1, 5, dtype, DEVICE)
    scale = torch.tensor(-1.0, device=DEVICE)
    lse = dot_lse_forward(q, k, scale, -1)
    dq, dk, dscale = dot_lse_backward(q, k, scale, lse, g, -1)
    assert lse[1].item() == float("-inf")
    assert torch.isfinite(lse[[0, 2]]).all()
    assert dq[1].abs().max() == 0
    keep = torch.tensor([0, 2], device=DEVICE)
    (r_lse, r_dq, r_dk, r_ds), mags = reference(q[keep], k, scale, None, None, g[keep])
    lse_rtol, g_rtol = TOL[dtype]
    assert_rel(lse[keep], r_lse, lse_rtol, mags[0], "lse")
    assert_rel(dq[keep], r_dq, g_rtol, mags[1], "dq")
    assert_rel(dk, r_dk, g_rtol, mags[2], "dk")
    assert_rel(dscale, r_ds, g_rtol, mags[3], "dscale")


@pytest.mark.parametrize("R, C, D", [(4, 0, 3), (0, 5, 3), (4, 5, 0)])
def test_degenerate_sizes(R, C, D):
    # No columns: lse = extra (or -inf); no rows: empty outputs; D = 0: all logits are 0.
    q, k, ex, g = make_inputs(R, C, max(D, 1), torch.float32, DEVICE, extra=True)
    q, k = q[:, :D], k[:, :D]
    scale = torch.tensor(20.0, device=DEVICE)
    for extra in (None, ex):
        lse = dot_lse_forward(q, k, scale, 0, extra)
        dq, dk, ds = dot_lse_backward(q, k, scale, lse, g, 0)
        if C == 0:
            if extra is None:
                assert torch.isneginf(lse).all()
            else:  # log2 units inside the kernel: equal up to rounding
                torch.testing.assert_close(lse, extra, rtol=1e-6, atol=1e-6)
            assert ds.item() == 0 and dq.abs().sum() == 0 and dk.shape == (0, D)
        else:
            (r_lse, r_dq, r_dk, r_ds), mags = reference(q, k, scale, 0, extra, g)
            for a, b, m, what in zip((lse, dq, dk, ds), (r_lse, r_dq, r_dk, r_ds), mags,
                                     ("lse", "dq", "dk", "dscale")):
                assert_rel(a, b, 1e-5, m, what)


def test_need_flags():
    q, k, ex, g = make_inputs(21, 19, 40, torch.float32, DEVICE, extra=True)
    scale = torch.tensor(20.0, device=DEVICE)
    lse = dot_lse_forward(q, k, scale, 3, ex)
    dq, dk, ds = dot_lse_backward(q, k, scale, lse, g, 3)
    dq1, dk1, ds1 = dot_lse_backward(q, k, scale, lse, g, 3, need_dq=False)
    assert dq1 is None
    torch.testing.assert_close(dk1, dk, rtol=0, atol=0)
    torch.testing.assert_close(ds1, ds, rtol=0, atol=0)
    dq2, dk2, ds2 = dot_lse_backward(q, k, scale, lse, g, 3, need_dk=False)
    assert dk2 is None
    torch.testing.assert_close(dq2, dq, rtol=0, atol=0)
    torch.testing.assert_close(ds2, ds, rtol=0, atol=0)
    dq3, dk3, ds3 = dot_lse_backward(q, k, scale, lse, g, 3, need_dq=False, need_dk=False)
    assert dq3 is None and dk3 is None
    torch.testing.assert_close(ds3, ds, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_configs_agree(dtype):
    # D = 40: SMALL_CONFIG walks D in 3 chunks (in-place dq/dk accumulation), WIDE_CONFIG
    # keeps the tiles resident. Both match the reference and each other within rounding.
    R, C, D = 37, 29, 40
    for cfg in (SMALL_CONFIG, WIDE_CONFIG):
        check(R, C, D, dtype, DEVICE, 4, True, 20.0, config=cfg)
    q, k, ex, g = make_inputs(R, C, D, dtype, DEVICE, extra=True)
    scale = torch.tensor(20.0, device=DEVICE)
    outs = []
    for cfg in (SMALL_CONFIG, WIDE_CONFIG, None):
        lse = dot_lse_forward(q, k, scale, 4, ex, config=cfg)
        outs.append((lse, *dot_lse_backward(q, k, scale, lse, g, 4, config=cfg)))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    # Relative to the terms summed into each result: dscale is a sum of terms of both signs,
    # so its own value can be far below them (its rounding differs between configs).
    _, mags = reference(q, k, scale, 4, ex, g)
    for other in outs[1:]:
        for x, y, what, mag in zip(outs[0], other, ("lse", "dq", "dk", "dscale"), mags):
            assert_rel(y, x, tol, mag, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("R, C, D, exclude_offset, extra", [
    (5, 300, 24, None, True),   # a MoCo queue: few rows, many columns
    (9, 260, 40, 3, False),     # exclusion in one split; D walked in chunks (SMALL_CONFIG)
    (4, 130, 16, None, True),   # the last split shorter than the others
])
def test_column_splits_agree(dtype, R, C, D, exclude_offset, extra):
    """Cutting the columns into splits (grid axis 1, partial max/sum and partial dq
    combined afterwards) changes nothing beyond rounding, and matches the reference."""
    q, k, ex, g = make_inputs(R, C, D, dtype, DEVICE, extra=extra)
    scale = torch.tensor(14.0, device=DEVICE)
    outs = []
    for n in (1, 2, 3):
        lse = dot_lse_forward(q, k, scale, exclude_offset, ex, config=SMALL_CONFIG, splits=n)
        outs.append((lse, *dot_lse_backward(q, k, scale, lse, g, exclude_offset,
                                            config=SMALL_CONFIG, splits=n)))
    (r_lse, r_dq, r_dk, r_ds), mags = reference(q, k, scale, exclude_offset, ex, g)
    lse_rtol, g_rtol = TOL[dtype]
    for lse, dq, dk, ds in outs:
        assert_rel(lse, r_lse, lse_rtol, mags[0], "lse")
        assert_rel(dq, r_dq, g_rtol, mags[1], "dq")
        assert_rel(dk, r_dk, g_rtol, mags[2], "dk")
        assert_rel(ds, r_ds, g_rtol, mags[3], "dscale")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    # Relative to the terms summed into each result: dscale is a sum of terms of both signs,
    # so its own value can be far below them (its rounding differs between configs).
    _, mags = reference(q, k, scale, 4, ex, g)
    for other in outs[1:]:
        for x, y, what, mag in zip(outs[0], other, ("lse", "dq", "dk", "dscale"), mags):
            assert_rel(y, x, tol, mag, what)


def test_column_splits_two_sided():
    """The two-sided (NT-Xent, CLIP) dq pass split over columns equals the unsplit one."""
    z = torch.nn.functional.normalize(torch.randn(40, 16, device=DEVICE), dim=1)
    g = torch.randn(40, device=DEVICE)
    scale = torch.tensor(5.0, device=DEVICE)
    lse = dot_lse_forward(z, z, scale, 0, config=SMALL_CONFIG)
    base = dot_lse_backward(z, z, scale, lse, g, 0, symmetric=True, config=SMALL_CONFIG)
    split = dot_lse_backward(z, z, scale, lse, g, 0, symmetric=True, config=SMALL_CONFIG, splits=3)
    for x, y in ((base[0], split[0]), (base[2], split[2])):
        assert_rel(y, x, 1e-5, x.abs().max(), "two-sided split")
    with pytest.raises(ValueError, match="splits must be None or a positive int"):
        dot_lse_forward(z, z, scale, splits=0)


@pytest.mark.parametrize("g_mag", [1e-7, 1e5])
def test_fp16_grad_range(g_mag):
    # dk's fp16 operand is g * p: tiny g would flush to zero, large g overflow, unless g
    # is normalized by max|g| first.
    R, C, D = 20, 33, 24
    q, k, _, g = make_inputs(R, C, D, torch.float16, DEVICE)
    g = g * g_mag
    scale = torch.tensor(20.0, device=DEVICE)
    lse = dot_lse_forward(q, k, scale, 1)
    dq, dk, ds = dot_lse_backward(q, k, scale, lse, g, 1)
    (_, r_dq, r_dk, r_ds), mags = reference(q, k, scale, 1, None, g)
    assert_rel(dq, r_dq, 1e-2, mags[1], "dq")
    assert_rel(dk, r_dk, 1e-2, mags[2], "dk")
    assert_rel(ds, r_ds, 1e-2, mags[3], "dscale")


def test_layouts_and_scale_on_device():
    # Row stride > D (a column slice) and a transposed operand (last-dim stride != 1).
    big_q = torch.randn(13, 50, device=DEVICE)
    q = big_q[:, 3:36]
    k = torch.randn(33, 11, device=DEVICE).T
    scale = torch.tensor(0.3, device=DEVICE)
    g = torch.randn(13, device=DEVICE)
    lse = dot_lse_forward(q, k, scale, 1)
    dq, dk, ds = dot_lse_backward(q, k, scale, lse, g, 1)
    (r_lse, r_dq, r_dk, r_ds), mags = reference(q, k, scale, 1, None, g)
    refs = (r_lse, r_dq, r_dk, r_ds)
    for a, b, m, what in zip((lse, dq, dk, ds), refs, mags, ("lse", "dq", "dk", "dscale")):
        assert_rel(a, b, 1e-5, m, what)
    # grad_lse as produced by sum().backward(): an expanded, stride-0 vector.
    g0 = torch.ones((), device=DEVICE).expand(13)
    dq0, _, _ = dot_lse_backward(q, k, scale, lse, g0, 1)
    (_, r_dq0, _, _), m0 = reference(q, k, scale, 1, None, g0.contiguous())
    assert_rel(dq0, r_dq0, 1e-5, m0[1], "dq (expanded grad)")


def test_outputs_poisoned(monkeypatch):
    # Every output element must be written: fresh buffers start as NaN.
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(dot_lse.torch, "empty", poisoned_empty)
    for cfg in (SMALL_CONFIG, None):
        check(18, 35, 24, torch.float32, DEVICE, 2, True, 20.0, config=cfg)


def test_bad_inputs():
    q = torch.randn(4, 8, device=DEVICE)
    k = torch.randn(5, 8, device=DEVICE)
    s = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(TypeError, match="same dtype"):
        dot_lse_forward(q, k.half(), s)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        dot_lse_forward(q.double(), k.double(), s)
    with pytest.raises(ValueError, match="2-D"):
        dot_lse_forward(q[0], k, s)
    with pytest.raises(ValueError, match="last dim"):
        dot_lse_forward(q, k[:, :7], s)
    with pytest.raises(ValueError, match="extra"):
        dot_lse_forward(q, k, s, extra=torch.zeros(5, device=DEVICE))
    with pytest.raises(TypeError, match="exclude_offset"):
        dot_lse_forward(q, k, s, exclude_offset=1.0)
    with pytest.raises(ValueError, match="BLOCK_D"):
        dot_lse_forward(q, k, s, config={"BLOCK_R": 16, "BLOCK_C": 16, "BLOCK_D": 8})
    lse = dot_lse_forward(q, k, s)
    with pytest.raises(ValueError, match="grad_lse"):
        dot_lse_backward(q, k, s, lse, torch.ones(3, device=DEVICE))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "case",
    [(1000, 1000, 128, 0, False, 20.0), (1000, 4000, 128, 2000, True, -1.0),
     (999, 1001, 300, 7, True, 20.0), (1, 1, 1, None, False, 20.0)],
    ids=lambda c: "R{}-C{}-D{}-off{}-ex{}-s{}".format(*c),
)
def test_parity_cuda(case, dtype):
    R, C, D, off, extra, scale = case
    check(R, C, D, dtype, "cuda", off, extra, scale)
    check(R, C, D, dtype, "cuda", off, extra, scale, config=SMALL_CONFIG)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "case", [(1000, 1000, 128, 0, False, 20.0), (999, 1001, 300, 7, True, 20.0)],
    ids=lambda c: "R{}-C{}-D{}-off{}-ex{}-s{}".format(*c))
def test_parity_cuda_tf32(case, tf32):
    R, C, D, off, extra, scale = case
    check(R, C, D, torch.float32, "cuda", off, extra, scale)
    check(R, C, D, torch.float32, "cuda", off, extra, scale, config=SMALL_CONFIG)


@pytest.mark.cuda
def test_empty_row_cuda():
    q, k, _, _ = make_inputs(1, 1, 128, torch.bfloat16, "cuda")
    scale = torch.tensor(20.0, device="cuda")
    lse = dot_lse_forward(q, k, scale, 0)
    dq, dk, ds = dot_lse_backward(q, k, scale, lse, torch.ones(1, device="cuda"), 0)
    assert lse.item() == float("-inf")
    assert dq.abs().max() == 0 and dk.abs().max() == 0 and ds.item() == 0


@pytest.mark.cuda
def test_memory_cuda():
    # No R x C buffer: the extra peak stays far below one R x C float32 matrix.
    R = C = 8192
    q, k, _, g = make_inputs(R, C, 128, torch.bfloat16, "cuda")
    scale = torch.tensor(20.0, device="cuda")
    dot_lse_backward(q, k, scale, dot_lse_forward(q, k, scale, 0), g, 0)  # autotune first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lse = dot_lse_forward(q, k, scale, 0)
    dq, dk, ds = dot_lse_backward(q, k, scale, lse, g, 0)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # Outputs dq, dk (fp32), the column splits' partial dq (fp32, summed into dq) and
    # O(R) vectors; one R x C fp32 matrix would be 256 MiB.
    n_splits, _ = dot_lse._split_plan(R, C, None, q.device)
    assert extra < ((n_splits + 1) * R + C) * 128 * 4 + (4 << 20), (extra, n_splits)
    assert extra < R * C * 4 // 8


# ----------------------------------------------------------------------------- symmetric


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,d,exclude_offset", [(1, 3, 0), (6, 16, 0), (37, 70, None), (40, 24, 0)])
@pytest.mark.parametrize("config", [None, SMALL_CONFIG])
def test_symmetric_backward_is_dq_plus_dk(dtype, n, d, exclude_offset, config):
    """NT-Xent's case (the rows against themselves): one symmetric pass gives dq + dk."""
    z = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    z = z.to(device=DEVICE, dtype=dtype)
    scale = torch.tensor(3.0, device=DEVICE)
    g = torch.rand(n, dtype=torch.float32, device=DEVICE) + 0.5  # not uniform
    lse = dot_lse_forward(z, z, scale, exclude_offset, config=config)
    dq, dk, ds = dot_lse_backward(z, z, scale, lse, g, exclude_offset, config=config)
    dz, none, ds_sym = dot_lse_backward(z, z, scale, lse, g, exclude_offset, symmetric=True,
                                        config=config)
    assert none is None
    full = dq + dk
    rtol = TOL[dtype][1]
    torch.testing.assert_close(dz, full, rtol=rtol, atol=rtol * full.abs().max().item() + 1e-12)
    torch.testing.assert_close(ds_sym, ds, rtol=1e-5, atol=1e-6)
    # ... and both equal the float64 reference's gradient of the rows.
    z64 = z.detach().double().requires_grad_()
    s64 = scale.double()
    logits = s64 * z64 @ z64.t()
    if exclude_offset == 0:
        logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=DEVICE), float("-inf"))
    (ref,) = torch.autograd.grad((torch.logsumexp(logits, 1) * g.double()).sum(), [z64])
    torch.testing.assert_close(dz.double(), ref, rtol=rtol, atol=rtol * ref.abs().max().item() + 1e-12)


def test_symmetric_needs_square_rows():
    z = torch.randn(4, 16, device=DEVICE)
    lse = torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError, match="symmetric=True"):
        dot_lse_backward(z, z, torch.tensor(1.0, device=DEVICE), lse, lse, 2, symmetric=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,d", [(1, 3), (7, 16), (37, 70)])
@pytest.mark.parametrize("config", [None, SMALL_CONFIG])
def test_two_sided_backward_is_both_directions(dtype, n, d, config):
    """CLIP's case: rows x against columns y, and y against x over the same logits.
    One two-sided pass per side gives each side's whole gradient."""
    x, y = (torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
            .to(device=DEVICE, dtype=dtype) for _ in range(2))
    scale = torch.tensor(-4.0, device=DEVICE)
    g = torch.rand(n, device=DEVICE) + 0.5
    h = torch.rand(n, device=DEVICE) + 0.5
    lse_x = dot_lse_forward(x, y, scale, config=config)
    lse_y = dot_lse_forward(y, x, scale, config=config)
    dq1, dk1, ds1 = dot_lse_backward(x, y, scale, lse_x, g, config=config)
    dq2, dk2, ds2 = dot_lse_backward(y, x, scale, lse_y, h, config=config)
    dx, none, ds = dot_lse_backward(x, y, scale, lse_x, g, col_lse=lse_y, col_grad=h, config=config)
    dy, _, _ = dot_lse_backward(y, x, scale, lse_y, h, col_lse=lse_x, col_grad=g, config=config)
    assert none is None
    rtol = TOL[dtype][1]
    for got, want in ((dx, dq1 + dk2), (dy, dq2 + dk1)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item() + 1e-12)
    torch.testing.assert_close(ds, ds1 + ds2, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_autotuned_path_matches_fixed_config(monkeypatch):
    """The test suite runs a fixed config; the benchmarks autotune: same results."""
    q = torch.nn.functional.normalize(torch.randn(300, 96, device="cuda"), dim=1)
    k = torch.nn.functional.normalize(torch.randn(500, 96, device="cuda"), dim=1)
    scale = torch.tensor(5.0, device="cuda")
    g = torch.rand(300, device="cuda")
    fixed = dot_lse_forward(q, k, scale), dot_lse_backward(q, k, scale, dot_lse_forward(q, k, scale), g)
    monkeypatch.setenv("SSLFAST_TRITON_AUTOTUNE", "1")
    lse = dot_lse_forward(q, k, scale)
    tuned = lse, dot_lse_backward(q, k, scale, lse, g)
    torch.testing.assert_close(tuned[0], fixed[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(tuned[1], fixed[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_autotuned_path(monkeypatch):
    """The autotuned launch, as the benchmarks and users run it (every other test pins
    one config): the keys name the problem size, a column-split launch keeps row tiles
    of the planned height, and every config of each kernel runs (the timing is stubbed:
    each config is called once and all tie, so the first left after pruning wins)."""
    from sslfast.kernels import dot_lse_pair as pair

    for mod in (dot_lse, pair):
        monkeypatch.setattr(mod, "_pick_config", lambda config, *_: config)

    def bench(fn, quantiles=None):
        fn()
        return [1.0, 1.0, 1.0]

    for tuned in (dot_lse._fwd_tuned, dot_lse._bwd_dq_tuned, dot_lse._bwd_dk_tuned,
                  pair._fwd_tuned, pair._bwd_tuned):
        monkeypatch.setattr(tuned, "_do_bench", bench)
        monkeypatch.setattr(tuned, "cache", {})
    R, C, D = 40, 1500, 200  # D = 200: chunked under BLOCK_D <= 128, resident under 256
    q, k, ex, g = make_inputs(R, C, D, torch.float32, DEVICE, extra=True)
    scale = torch.tensor(2.0, device=DEVICE)
    lse = dot_lse_forward(q, k, scale, 3, ex, splits=2)
    dq, dk, ds = dot_lse_backward(q, k, scale, lse, g, 3, splits=2)
    (r_lse, r_dq, r_dk, r_ds), mags = reference(q, k, scale, 3, ex, g)
    assert_rel(lse, r_lse, 1e-5, mags[0], "lse")
    for x, r, m, what in ((dq, r_dq, mags[1], "dq"), (dk, r_dk, mags[2], "dk"),
                          (ds, r_ds, mags[3], "dscale")):
        assert_rel(x, r, 1e-5, m, what)
    (key, best), = dot_lse._fwd_tuned.cache.items()
    assert key[:2] == (R, C) and best.kwargs["BLOCK_R"] <= dot_lse._NOMINAL_BLOCK_R
    assert next(iter(dot_lse._bwd_dq_tuned.cache.values())).kwargs["BLOCK_R"] <= 64
    assert dot_lse._FWD_CONFIGS[0].kwargs["BLOCK_R"] > 64  # the pruning is what chose

    z = torch.nn.functional.normalize(torch.randn(64, D, device=DEVICE), dim=1)
    lse_z, _ = pair.dot_lse_pair_forward(z, None, scale, exclude_diagonal=True)
    dz, _, _ = pair.dot_lse_pair_backward(z, None, scale, lse_z, None, g.new_ones(64), None,
                                          exclude_diagonal=True)
    ref_lse = dot_lse_forward(z, z, scale, 0, config=SMALL_CONFIG)
    ref_dz = dot_lse_backward(z, z, scale, ref_lse, g.new_ones(64), 0, symmetric=True,
                              config=SMALL_CONFIG)[0]
    assert_rel(lse_z, ref_lse, 1e-5, ref_lse.abs().max(), "pair lse")
    assert_rel(dz, ref_dz, 1e-5, ref_dz.abs().max(), "pair dz")
    assert [k[:2] for k in pair._fwd_tuned.cache] == [(64, 64)]


def test_deterministic_mode_pins_the_config(monkeypatch):
    """Under use_deterministic_algorithms no config is autotuned (timing noise could pick
    another in another process, and with it another order of the sums)."""
    monkeypatch.setattr(dot_lse, "_INTERPRET", False)
    monkeypatch.setenv("SSLFAST_TRITON_AUTOTUNE", "1")
    assert dot_lse._pick_config(None, "interp", "fixed") is None
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert dot_lse._pick_config(None, "interp", "fixed") == "fixed"
        assert dot_lse._pick_config({"BLOCK_R": 16}, "interp", "fixed") == {"BLOCK_R": 16}
    finally:
        torch.use_deterministic_algorithms(before)
