"""Triton tile-pair kernels (sslfast.kernels.dot_lse_pair): both directions of one logit
matrix in one pass (CLIP) and the symmetric Z Z^T visited once per tile pair (NT-Xent),
against a dense float64 reference and against the one-direction kernels."""

import weakref

import pytest
import torch
import torch.utils._python_dispatch

pytest.importorskip("triton")

from sslfast.kernels import dot_lse_pair as pair  # noqa: E402
from sslfast.kernels.dot_lse import dot_lse_backward, dot_lse_forward  # noqa: E402
from sslfast.kernels.dot_lse_pair import (  # noqa: E402
    dot_lse_pair_backward,
    dot_lse_pair_forward,
)
from tests.test_dot_lse_kernels import TF32_TOL  # noqa: E402
from tests.utils import TRITON_DEVICE as DEVICE  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-4, 1e-2), torch.float16: (1e-4, 1e-2)}
# D = 40 > BLOCK_D = 16: D walked in chunks, gradients by atomics per chunk.
SMALL_CONFIG = {"BLOCK": 16, "BLOCK_D": 16, "num_warps": 4, "num_stages": 1}


def reference(x, y, scale, exclude_diagonal, g, h):
    """Dense float64 (lse_x, lse_y, dx, dy, dscale) of sum(g lse_x) + sum(h lse_y), and
    the magnitudes of the terms summed into each (for tolerances). y None: x against
    itself, objective sum(g lse_x) (lse_y is lse_x), dy None."""
    x64 = x.detach().double().requires_grad_()
    y64 = x64 if y is None else y.detach().double().requires_grad_()
    s64 = scale.detach().double().requires_grad_()
    dots = x64 @ y64.T
    logits = s64 * dots
    if exclude_diagonal:
        eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
        logits = logits.masked_fill(eye, float("-inf"))
    lse_x, lse_y = torch.logsumexp(logits, 1), torch.logsumexp(logits, 0)
    obj = (g.double() * lse_x).sum()
    if y is not None:
        obj = obj + (h.double() * lse_y).sum()
    wrt = [x64, s64] + ([] if y is None else [y64])
    grads = torch.autograd.grad(obj, wrt)
    with torch.no_grad():
        w = g.double().abs()[:, None] * torch.exp(logits - lse_x[:, None])
        hh = g if y is None else h
        w = w + hh.double().abs()[None, :] * torch.exp(logits - lse_y[None, :])
        mags = (lse_x.abs().max(), (s64.abs() * w @ y64.abs()).max(),
                (s64.abs() * w.T @ x64.abs()).max(), (w * dots.abs()).sum())
    dy = None if y is None else grads[2]
    return (lse_x.detach(), lse_y.detach(), grads[0], dy, grads[1]), mags


def assert_rel(actual, expected, rtol, magnitude, what):
    atol = rtol * max(float(magnitude), 1e-30)
    torch.testing.assert_close(
        actual.detach().to("cpu", torch.float64), expected.detach().to("cpu", torch.float64),
        rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def features(n, d, dtype, device=DEVICE, norm=1.0):
    z = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1) * norm
    return z.to(device, dtype)


def run_pair(x, y, scale, exclude_diagonal, g, h, **kw):
    lse_x, lse_y = dot_lse_pair_forward(x, y, scale, exclude_diagonal=exclude_diagonal, **kw)
    dx, dy, ds = dot_lse_pair_backward(x, y, scale, lse_x, None if y is None else lse_y, g,
                                       None if y is None else h,
                                       exclude_diagonal=exclude_diagonal, **kw)
    return lse_x, lse_y, dx, dy, ds


def check(R, C, D, dtype, scale, symmetric, exclude_diagonal=False, norm=1.0, grad_rtol=None,
          device=DEVICE, **kw):
    x = features(R, D, dtype, device, norm)
    y = None if symmetric else features(C, D, dtype, device, norm)
    g = torch.rand(R, device=device) + 0.5  # not uniform
    h = None if symmetric else torch.rand(C, device=device) + 0.5
    scale_t = torch.tensor(float(scale), device=device)
    got = run_pair(x, y, scale_t, exclude_diagonal, g, h, **kw)
    lse_x, lse_y, dx, dy, ds = got
    assert lse_x.dtype == dx.dtype == ds.dtype == torch.float32
    assert dx.shape == (R, D) and ds.shape == ()
    assert (dy is None) == symmetric
    (r_lx, r_ly, r_dx, r_dy, r_ds), mags = reference(x, y, scale_t, exclude_diagonal, g, h)
    use_tf32 = dtype == torch.float32 and not pair._ieee(dtype)
    lse_rtol, g_rtol = TF32_TOL if use_tf32 else TOL[dtype]
    g_rtol = grad_rtol or g_rtol
    assert_rel(lse_x, r_lx, lse_rtol, mags[0], "lse_x")
    assert_rel(lse_y, r_ly, lse_rtol, mags[0], "lse_y")
    assert_rel(dx, r_dx, g_rtol, mags[1], "dx")
    if not symmetric:
        assert_rel(dy, r_dy, g_rtol, mags[2], "dy")
    assert_rel(ds, r_ds, g_rtol, mags[3], "dscale")
    return got


# (R, C, D, scale): odd sizes, D below/across BLOCK_D, negative and CLIP-sized scales.
CLIP_CASES = [(1, 1, 1, 10.0), (3, 5, 3, -2.0), (37, 53, 24, 14.3), (20, 45, 100, 100.0),
              (64, 64, 40, 30.0)]
SYM_CASES = [(1, 3, False), (2, 5, True), (6, 16, True), (37, 70, False), (40, 24, True),
             (65, 40, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CLIP_CASES, ids=lambda c: "R{}-C{}-D{}-s{}".format(*c))
@pytest.mark.parametrize("config, splits", [(None, None), (SMALL_CONFIG, 3)],
                         ids=["default", "small-split3"])
def test_clip_parity(case, dtype, config, splits):
    R, C, D, scale = case
    check(R, C, D, dtype, scale, False, config=config, splits=splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", SYM_CASES, ids=lambda c: "N{}-D{}-excl{}".format(*c))
@pytest.mark.parametrize("config, splits", [(None, None), (SMALL_CONFIG, 2), (SMALL_CONFIG, 5)],
                         ids=["default", "small-split2", "small-split5"])
def test_symmetric_parity(case, dtype, config, splits):
    n, d, excl = case
    check(n, n, d, dtype, 5.0, True, excl, config=config, splits=splits)


@pytest.mark.parametrize("case", [(37, 53, 24, 14.3, False), (40, 40, 24, 20.0, True)],
                         ids=lambda c: "R{}-C{}-D{}-s{}-sym{}".format(*c))
def test_parity_tf32(case, tf32):
    # fp32 on TF32 tensor cores when torch's fp32 matmuls would use them; not the IEEE result.
    R, C, D, scale, symmetric = case
    torch.manual_seed(1)
    got = check(R, C, D, torch.float32, scale, symmetric, symmetric, config=SMALL_CONFIG,
                splits=2)
    torch.manual_seed(1)  # the same inputs again (check draws them first)
    x = features(R, D, torch.float32)
    y = None if symmetric else features(C, D, torch.float32)
    g = torch.rand(R) + 0.5
    h = None if symmetric else torch.rand(C) + 0.5
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    ieee = dot_lse_pair_forward(x, y, torch.tensor(scale), exclude_diagonal=symmetric,
                                config=SMALL_CONFIG, splits=2)
    assert not torch.equal(got[0], ieee[0])
    # the backward's dots too: from the TF32 lse, only the precision differs
    dx, _, _ = dot_lse_pair_backward(x, y, torch.tensor(scale), got[0],
                                     None if symmetric else got[1], g, h,
                                     exclude_diagonal=symmetric, config=SMALL_CONFIG, splits=2)
    assert not torch.equal(dx, got[2])
    torch.testing.assert_close(dx, got[2], rtol=0, atol=0.05 * got[2].abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "clip"])
def test_one_exp2_tiles(symmetric, dtype, monkeypatch):
    """At |scale| = 5 every tile's shifts and lse lie within _ONE_EXP_SPREAD: the
    default takes one exp2 per entry (bit-equal to forcing it) and the two-exp2 path
    (forced) agrees with the reference too, with different rounding. (Bit equality
    only in the interpreter: on a GPU the atomics' order varies from run to run.)"""
    n, d = 70, 24
    got = {}
    for name, spread in (("default", pair._ONE_EXP_SPREAD), ("one", float("inf")),
                         ("two", -1.0)):
        monkeypatch.setattr(pair, "_ONE_EXP_SPREAD", spread)
        torch.manual_seed(3)
        got[name] = check(n, n + 9, d, dtype, 5.0, symmetric, symmetric, config=SMALL_CONFIG,
                          splits=2)
    one, two = [torch.cat([t.reshape(-1) for t in got[k] if t is not None])
                for k in ("one", "two")]
    default = torch.cat([t.reshape(-1) for t in got["default"] if t is not None])
    if DEVICE == "cpu":
        assert torch.equal(default, one)
        assert not torch.equal(one, two)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "clip"])
def test_rows_recomputed_where_the_shift_fails(symmetric):
    """At |scale| = 200 a row whose anchor logit is far below its bound gets a shift that
    leaves its sum below 2^-72 (the anchor's term underflows): the finalize kernel must
    recompute those rows exactly. Asserts such rows exist, then parity."""
    n, d = 40, 64
    x = features(n, d, torch.float32)
    y = None if symmetric else features(n + 7, d, torch.float32)
    g = torch.rand(n, device=DEVICE) + 0.5
    h = None if symmetric else torch.rand(n + 7, device=DEVICE) + 0.5
    scale = torch.tensor(200.0, device=DEVICE)
    got = run_pair(x, y, scale, symmetric, g, h)
    (r_lx, r_ly, r_dx, r_dy, r_ds), mags = reference(x, y, scale, symmetric, g, h)
    shift_x, shift_y = pair._shifts(x, y, scale, symmetric)
    below = (r_lx * pair._LOG2E - shift_x) < -72  # log2 of each row's shifted sum
    assert below.sum() >= n // 4, "the case no longer exercises the recompute"
    assert_rel(got[0], r_lx, 1e-5, mags[0], "lse_x")
    assert_rel(got[2], r_dx, 1e-5, mags[1], "dx")
    if not symmetric:
        assert ((r_ly * pair._LOG2E - shift_y) < -72).sum() >= n // 4
        assert_rel(got[1], r_ly, 1e-5, mags[0], "lse_y")
        assert_rel(got[3], r_dy, 1e-5, mags[2], "dy")


@pytest.mark.parametrize("dtype, d, symmetric, scale", [
    (torch.bfloat16, 100, False, 200.0),   # D beyond the finalize kernel's BLOCK_D
    (torch.float32, 40, True, -200.0),     # the diagonal included, a negative scale
])
def test_recompute_variants(dtype, d, symmetric, scale):
    """The recompute path with D walked in chunks, low precision, no exclusion."""
    n = 37
    x = features(n, d, dtype)
    y = None if symmetric else features(n + 4, d, dtype)
    g = torch.randn(n, device=DEVICE)  # mixed signs
    h = None if symmetric else torch.randn(n + 4, device=DEVICE)
    s = torch.tensor(scale, device=DEVICE)
    got = run_pair(x, y, s, False, g, h, config=SMALL_CONFIG, splits=2)
    (r_lx, r_ly, r_dx, r_dy, r_ds), mags = reference(x, y, s, False, g, h)
    shift_x, _ = pair._shifts(x, y, s, symmetric)
    assert ((r_lx * pair._LOG2E - shift_x) < -72).any()
    lse_rtol, g_rtol = TOL[dtype]
    assert_rel(got[0], r_lx, lse_rtol, mags[0], "lse_x")
    assert_rel(got[2], r_dx, g_rtol, mags[1], "dx")
    assert_rel(got[4], r_ds, g_rtol, mags[3], "dscale")
    if not symmetric:
        assert_rel(got[1], r_ly, lse_rtol, mags[0], "lse_y")
        assert_rel(got[3], r_dy, g_rtol, mags[2], "dy")


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "clip"])
def test_logits_near_1e9(symmetric):
    """Logits at their Cauchy-Schwarz bound (the diagonal included; CLIP with y = x) near
    1e9: fp32 rounding lifts a term above its shift's bound and the sum overflows to
    inf, which the finalize kernel must recompute (not return inf)."""
    x = features(8, 64, torch.float32, norm=1e4)
    y = None if symmetric else x.clone()
    s = torch.tensor(10.0, device=DEVICE)
    lse_x, lse_y = dot_lse_pair_forward(x, y, s)
    want = dot_lse_forward(x, x, s)
    assert torch.isfinite(lse_x).all() and torch.isfinite(lse_y).all()
    torch.testing.assert_close(lse_x, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(lse_y, want, rtol=1e-6, atol=0)


class _PeakAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of new tensor storage alive at once while active (views of storage that
    existed before, such as the inputs, are not counted)."""

    def __init__(self, *existing):
        super().__init__()
        self.seen = {t.untyped_storage().data_ptr() for t in existing}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if key in self.seen or size == 0:
                continue
            self.seen.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, key, size)
        return out

    def _free(self, key, size):
        self.live -= size
        self.seen.discard(key)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "clip"])
def test_shifts_hold_no_copy_of_the_features(symmetric):
    # The shifts' temporaries are O(R + C): no float32 (or any) copy of the features.
    n, d = 4096, 128
    x = features(n, d, torch.bfloat16)
    y = None if symmetric else features(n, d, torch.bfloat16)
    s = torch.tensor(10.0, device=DEVICE)
    with _PeakAllocations(x, *([] if y is None else [y])) as tracker:
        pair._shifts(x, y, s, symmetric)
    assert 0 < tracker.peak < 64 * n, tracker.peak  # 16 floats per row; x alone is 256 per row


def test_need_dy():
    x, y = features(21, 24, torch.bfloat16), features(30, 24, torch.bfloat16)
    g, h = torch.rand(21, device=DEVICE), torch.rand(30, device=DEVICE)
    s = torch.tensor(5.0, device=DEVICE)
    lse_x, lse_y = dot_lse_pair_forward(x, y, s)
    dx, dy, ds = dot_lse_pair_backward(x, y, s, lse_x, lse_y, g, h)
    dx1, dy1, ds1 = dot_lse_pair_backward(x, y, s, lse_x, lse_y, g, h, need_dy=False)
    assert dy is not None and dy1 is None
    torch.testing.assert_close(dx1, dx, rtol=1e-6, atol=1e-6 * dx.abs().max().item())
    torch.testing.assert_close(ds1, ds, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scale", [10.0, 100.0])
def test_no_recompute_for_matched_pairs(scale):
    """The anchors make the recompute rare: CLIP at its largest scale (100) and NT-Xent
    (the row half-way round is the positive), with positives of similarity about 0.3 and
    random negatives, leave every row's shifted sum far above 2^-72."""
    n, d = 64, 128
    x = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(x + 3 * torch.randn(n, d, dtype=torch.float64) / d**0.5,
                                      dim=1)
    assert 0.2 < (x * y).sum(1).mean() < 0.45
    x, y = x.float().to(DEVICE), y.float().to(DEVICE)
    s = torch.tensor(scale, device=DEVICE)
    g = torch.ones(n, device=DEVICE)
    z = torch.cat([x, y])
    for a, b, excl in ((x, y, False), (z, None, True)):
        (r_lx, r_ly, *_), _ = reference(a, b, s, excl, torch.ones(a.shape[0], device=DEVICE),
                                         None if b is None else g)
        shift_x, shift_y = pair._shifts(a, b, s, b is None)
        assert ((r_lx * pair._LOG2E - shift_x) > -40).all()
        if b is not None:
            assert ((r_ly * pair._LOG2E - shift_y) > -40).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "clip"])
def test_large_magnitudes(dtype, symmetric):
    # Logits up to |20 * 10 * 10| = 2000 (unnormalized features): nothing overflows.
    lse = check(19, 21, 5, dtype, 20.0, symmetric, symmetric, norm=10.0,
                grad_rtol=1e-3 if dtype == torch.float32 else 2e-2)[0]
    assert lse.abs().max() > 500


def test_empty_row():
    # One row against itself without the diagonal: the set is empty, lse = -inf, no gradient.
    z = features(1, 8, torch.float32)
    scale = torch.tensor(2.0, device=DEVICE)
    lse, _, dz, _, ds = run_pair(z, None, scale, True, torch.ones(1, device=DEVICE), None)
    assert lse.item() == float("-inf")
    assert dz.abs().max() == 0 and ds.item() == 0


@pytest.mark.parametrize("R, C, D", [(4, 0, 3), (0, 5, 3), (4, 5, 0)])
def test_degenerate_sizes(R, C, D):
    x = features(R, max(D, 1), torch.float32)[:, :D]
    y = features(C, max(D, 1), torch.float32)[:, :D]
    g, h = torch.rand(R, device=DEVICE), torch.rand(C, device=DEVICE)
    scale = torch.tensor(3.0, device=DEVICE)
    lse_x, lse_y, dx, dy, ds = run_pair(x, y, scale, False, g, h)
    assert lse_x.shape == (R,) and lse_y.shape == (C,) and dx.shape == (R, D)
    assert dy.shape == (C, D)
    if R and C:  # D = 0: every logit is 0, lse = log(count)
        torch.testing.assert_close(lse_x, torch.full((R,), float(C)).log().to(DEVICE))
        torch.testing.assert_close(lse_y, torch.full((C,), float(R)).log().to(DEVICE))
    else:
        assert torch.isneginf(lse_x).all() and torch.isneginf(lse_y).all()
    assert dx.abs().sum() == 0 and dy.abs().sum() == 0 and ds.item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_agrees_with_one_direction_kernels(dtype):
    """The tile-pair results equal the one-direction kernels' within rounding, and under
    torch.use_deterministic_algorithms the launchers are those kernels, bit for bit."""
    x, y = features(37, 40, dtype), features(29, 40, dtype)
    g, h = torch.rand(37, device=DEVICE), torch.rand(29, device=DEVICE)
    scale = torch.tensor(7.0, device=DEVICE)
    fast = run_pair(x, y, scale, False, g, h, config=SMALL_CONFIG, splits=2)
    one_x, one_y = dot_lse_forward(x, y, scale), dot_lse_forward(y, x, scale)
    dx, _, ds = dot_lse_backward(x, y, scale, one_x, g, col_lse=one_y, col_grad=h)
    dy, _, _ = dot_lse_backward(y, x, scale, one_y, h, col_lse=one_x, col_grad=g)
    tol = TOL[dtype][1]
    for a, b, what in zip(fast, (one_x, one_y, dx, dy, ds), ("lse_x", "lse_y", "dx", "dy", "ds")):
        assert_rel(a, b, tol, b.abs().max(), what)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = run_pair(x, y, scale, False, g, h)
        z = features(20, 16, dtype)
        gz = torch.rand(20, device=DEVICE)
        det_sym = run_pair(z, None, scale, True, gz, None)
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip(det, (one_x, one_y, dx, dy, ds)):
        assert torch.equal(a, b)
    lse_z = dot_lse_forward(z, z, scale, 0)
    dz, _, dsz = dot_lse_backward(z, z, scale, lse_z, gz, 0, symmetric=True)
    assert torch.equal(det_sym[0], lse_z) and torch.equal(det_sym[2], dz)
    assert torch.equal(det_sym[4], dsz)


@pytest.mark.parametrize("g_mag", [1e-7, 1e5])
def test_fp16_grad_range(g_mag):
    # W's fp16 operand holds g P + h P' / max|g, h|: tiny or huge g neither flush nor overflow.
    x, y = features(20, 24, torch.float16), features(33, 24, torch.float16)
    g, h = torch.rand(20, device=DEVICE) * g_mag, torch.rand(33, device=DEVICE) * g_mag
    scale = torch.tensor(20.0, device=DEVICE)
    _, _, dx, dy, ds = run_pair(x, y, scale, False, g, h)
    (_, _, r_dx, r_dy, r_ds), mags = reference(x, y, scale, False, g, h)
    assert_rel(dx, r_dx, 1e-2, mags[1], "dx")
    assert_rel(dy, r_dy, 1e-2, mags[2], "dy")
    assert_rel(ds, r_ds, 1e-2, mags[3], "dscale")


def test_layouts():
    # Row stride > D (a column slice) and a transposed operand (last-dim stride != 1).
    x = torch.randn(13, 50, device=DEVICE)[:, 3:36]
    y = torch.randn(33, 17, device=DEVICE).T
    g, h = torch.rand(13, device=DEVICE), torch.rand(17, device=DEVICE)
    scale = torch.tensor(0.3, device=DEVICE)
    got = run_pair(x, y, scale, False, g, h)
    (r_lx, r_ly, r_dx, r_dy, r_ds), mags = reference(x, y, scale, False, g, h)
    for a, b, m, what in zip(got, (r_lx, r_ly, r_dx, r_dy, r_ds), (mags[0], mags[0], *mags[1:]),
                             ("lse_x", "lse_y", "dx", "dy", "dscale")):
        assert_rel(a, b, 1e-5, m, what)


def test_bad_inputs():
    x = torch.randn(4, 8, device=DEVICE)
    y = torch.randn(5, 8, device=DEVICE)
    s = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match="exclude_diagonal"):
        dot_lse_pair_forward(x, y, s, exclude_diagonal=True)
    with pytest.raises(ValueError, match="splits"):
        dot_lse_pair_forward(x, y, s, splits=0)
    with pytest.raises(ValueError, match="last dim"):
        dot_lse_pair_forward(x, y[:, :7], s)
    with pytest.raises(ValueError, match="BLOCK_D"):
        dot_lse_pair_forward(x, y, s, config={"BLOCK": 16, "BLOCK_D": 8})
    with pytest.raises(ValueError, match="BLOCK"):
        dot_lse_pair_forward(x, y, s, config={"BLOCK_R": 32, "BLOCK_C": 32, "BLOCK_D": 64})
    with pytest.raises(ValueError, match="BLOCK"):
        dot_lse_pair_forward(x, y, s, config={"BLOCK": 24, "BLOCK_D": 64})
    with pytest.raises(TypeError, match="config"):
        dot_lse_pair_forward(x, y, s, config=[16, 16])
    lse_x, lse_y = dot_lse_pair_forward(x, y, s)
    with pytest.raises(ValueError, match="grad_y"):
        dot_lse_pair_backward(x, y, s, lse_x, lse_y, lse_x, torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match="lse_y=None"):
        dot_lse_pair_backward(x, None, s, lse_x, lse_x, lse_x, None)


@pytest.mark.parametrize("tiles", [1, 3, 32, 256, 4096])
def test_auto_splits(tiles):
    # Enough programs to fill 132 SMs where the tiles allow; never more splits than tiles.
    for symmetric, per_sm in ((False, pair._PROGRAMS_PER_SM),
                              (True, pair._PROGRAMS_PER_SM_SYMMETRIC)):
        splits = pair._auto_splits(tiles, tiles, 132, symmetric)
        assert 1 <= splits <= min(tiles, pair._MAX_SPLITS)
        if splits < min(tiles, pair._MAX_SPLITS):
            assert splits * tiles >= per_sm * 132
        assert (splits - 1) * tiles < per_sm * 132 or splits == 1


@pytest.mark.parametrize("splits", [None, 5])
def test_grid_is_one_axis_for_millions_of_rows(splits):
    # 3M rows in 16-row tiles are 187500 row tiles, past grid axis 1's 65535: the row
    # tiles and their splits share axis 0 (2^31 - 1), each row tile's splits in a row.
    launched = []

    class Kernel:
        def __getitem__(self, grid):
            launched.append(grid)
            return lambda *args, **meta: None

    n = 3_000_000
    x = torch.empty((n, 8), device="meta")
    pair._launch(Kernel(), None, SMALL_CONFIG, n, n, 8, splits, True, x)
    tiles = n // SMALL_CONFIG["BLOCK"]
    assert launched == [((splits or 1) * tiles,)]


# ----------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", [(1000, 1000, 128, True), (1500, 1500, 256, False),
                                  (999, 1001, 300, False)],
                         ids=lambda c: "R{}-C{}-D{}-sym{}".format(*c))
def test_parity_cuda(case, dtype):
    R, C, D, symmetric = case
    check(R, C, D, dtype, 20.0, symmetric, symmetric, device="cuda")
    check(R, C, D, dtype, 20.0, symmetric, symmetric, device="cuda",
          config={"BLOCK": 32, "BLOCK_D": 64, "num_warps": 4, "num_stages": 2}, splits=7)


@pytest.mark.cuda
@pytest.mark.parametrize("case", [(1000, 1000, 128, True), (999, 1001, 300, False)],
                         ids=lambda c: "R{}-C{}-D{}-sym{}".format(*c))
def test_parity_cuda_tf32(case, tf32):
    R, C, D, symmetric = case
    check(R, C, D, torch.float32, 20.0, symmetric, symmetric, device="cuda")


@pytest.mark.cuda
def test_autotuned_path_matches_fixed_config(monkeypatch):
    x, y = features(700, 96, torch.bfloat16, "cuda"), features(900, 96, torch.bfloat16, "cuda")
    g, h = torch.rand(700, device="cuda"), torch.rand(900, device="cuda")
    scale = torch.tensor(14.3, device="cuda")
    fixed = run_pair(x, y, scale, False, g, h)
    monkeypatch.setenv("SSLFAST_TRITON_AUTOTUNE", "1")
    tuned = run_pair(x, y, scale, False, g, h)  # the autotuner zeroes the atomic outputs
    for a, b in zip(tuned, fixed):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item())


@pytest.mark.cuda
def test_memory_cuda():
    # No N x N buffer: outputs (fp32 gradients) and O(N) vectors only.
    n, d = 16384, 128
    z = features(n, d, torch.bfloat16, "cuda")
    g = torch.full((n,), 1.0 / n, device="cuda")
    scale = torch.tensor(10.0, device="cuda")
    run_pair(z, None, scale, True, g, None)  # autotune first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run_pair(z, None, scale, True, g, None)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < n * d * 4 + (8 << 20)  # one N x N fp32 matrix would be 1 GiB
