"""DINO loss (sslfast.functional.dino_loss / sslfast.DINOLoss) against the float64
definition and lightly's DINOLoss; the Triton kernels under the interpreter."""

import pytest
import torch

import sslfast
from sslfast.functional import dino_loss
from sslfast.reference.dino import dino_reference
from tests.utils import TOLERANCES, TRITON, TRITON_DEVICE, device_for, spawn_gloo

# The interpreter's numpy warns on exp2 overflow in lanes that are masked out.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _crops(n_crops, n, k, dtype, device="cpu", scale=1.0, grad=False):
    return [(torch.randn(n, k, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
            .requires_grad_(grad) for _ in range(n_crops)]


def _inputs(T, S, n, k, dtype=torch.float32, device="cpu", scale=1.0):
    teacher = _crops(T, n, k, dtype, device, scale)
    student = _crops(S, n, k, dtype, device, scale, grad=True)
    center = (0.1 * torch.randn(1, 1, k, dtype=torch.float64)).to(device=device,
                                                                   dtype=torch.float32)
    return teacher, student, center


def _reference(teacher, student, center, tt, ts):
    """Loss and student gradients of the definition, in float64 on the CPU, on the same
    inputs (the callers compare on the CPU)."""
    s64 = [x.detach().cpu().double().requires_grad_() for x in student]
    tt64 = tt.detach().cpu().double() if isinstance(tt, torch.Tensor) else tt
    loss = dino_reference([x.detach().cpu().double() for x in teacher], s64,
                          center.cpu().double(), tt64, ts)
    grads = torch.autograd.grad(loss, s64, allow_unused=True)  # T = 1: crop 0 is in no pair
    return loss.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(s64, grads)]


def _natural_grad(teacher, student, ts, upstream=1.0):
    """The scale of d loss / d s: count_b / (tau_s n_terms N) (a softmax near 1 that
    cancels against Q leaves rounding errors of this size)."""
    T, S, n = len(teacher), len(student), student[0].shape[0]
    return upstream * T / (ts * (T * S - min(T, S)) * n)


def _check(teacher, student, center, backend, tt=0.04, ts=0.1, grad_dtype=None):
    """Loss within float32 rounding (it is computed in float32 from the exact inputs,
    float64 for float64 inputs); gradients within the student dtype's tolerance,
    measured against their largest magnitude."""
    loss = dino_loss(teacher, student, center, tt, ts, backend=backend)
    grads = torch.autograd.grad(loss, student)
    ref, ref_grads = _reference(teacher, student, center, tt, ts)
    ct = torch.float64 if student[0].dtype == torch.float64 else torch.float32
    rtol, atol = TOLERANCES[ct]
    torch.testing.assert_close(loss.detach().cpu().double(), ref.detach(), rtol=rtol,
                               atol=atol * max(1.0, abs(float(ref))))
    rtol = TOLERANCES[grad_dtype or student[0].dtype][0]
    scale = max(max(float(g.abs().max()) for g in ref_grads), _natural_grad(teacher, student, ts))
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == student[0].dtype and g.shape == student[i].shape
        torch.testing.assert_close(g.cpu().double(), r, rtol=rtol, atol=rtol * max(scale, 1e-30),
                                   msg=lambda m, i=i: f"student_out[{i}] gradient: {m}")
    return loss


# ---- CPU backend (and the reference backend) against the definition --------------------

CROPS = [(2, 2), (2, 10), (1, 3), (3, 2)]


@pytest.mark.parametrize("T,S", CROPS)
@pytest.mark.parametrize("n", [1, 3, 17])
@pytest.mark.parametrize("k", [1, 7, 300, 4099])
def test_cpu_parity(T, S, n, k):
    _check(*_inputs(T, S, n, k), "cpu")


@pytest.mark.parametrize("T,S", [(2, 10), (1, 3)])
@pytest.mark.parametrize("k", [7, 4099])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_cpu_dtypes(T, S, k, dtype):
    _check(*_inputs(T, S, 17, k, dtype), "cpu")


@pytest.mark.parametrize("tt,ts", [(0.07, 0.1), (0.04, 1.0), (1.0, 0.05), (0.5, 3.0)])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_temperatures(tt, ts, backend):
    _check(*_inputs(2, 4, 5, 257), backend, tt, ts)


def test_teacher_temp_tensor():
    teacher, student, center = _inputs(2, 3, 4, 33)
    tt = torch.tensor(0.06, requires_grad=True)
    loss = _check(teacher, student, center, "cpu", tt=tt)
    assert loss.detach() == dino_loss(teacher, student, center, 0.06, 0.1)
    assert tt.grad is None  # the teacher side, its temperature included, gets no gradient


def test_cpu_blocks_of_rows(monkeypatch):
    """Rows split into several blocks give the same result."""
    from sslfast.ops import dino

    monkeypatch.setattr(dino, "_CPU_BLOCK_ELEMS", 5 * 64 * 3)  # 3 rows of K = 64 at T = 2
    _check(*_inputs(2, 3, 17, 64), "cpu")


def test_mixed_dtypes_and_layouts():
    """bf16 teacher with fp32 students; a (crops, N, K) tensor; non-contiguous crops."""
    teacher, student, center = _inputs(2, 3, 6, 50)
    teacher = [t.bfloat16() for t in teacher]
    _check(teacher, student, center, "cpu")
    stacked = torch.stack([s.detach() for s in student]).requires_grad_()
    loss = dino_loss(torch.stack(teacher), stacked, center.view(-1))
    ref, ref_grads = _reference(teacher, list(stacked.unbind(0)), center, 0.04, 0.1)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    ref_ds = torch.stack(ref_grads)
    torch.testing.assert_close(torch.autograd.grad(loss, stacked)[0].double(), ref_ds,
                               rtol=1e-5, atol=1e-5 * float(ref_ds.abs().max()))
    wide = [torch.randn(6, 100)[:, ::2].requires_grad_() for _ in range(3)]
    _check([t.float() for t in teacher], wide, center.view(1, 50), "cpu")


def test_teacher_gets_no_gradient():
    teacher, student, center = _inputs(2, 3, 4, 9)
    teacher = [t.requires_grad_() for t in teacher]
    dino_loss(teacher, student, center).backward()
    assert all(t.grad is None for t in teacher) and all(s.grad is not None for s in student)


def test_no_grad_and_inputs_unchanged():
    teacher, student, center = _inputs(2, 3, 4, 9)
    before = [x.detach().clone() for x in (*teacher, *student, center)]
    with torch.no_grad():
        loss = dino_loss(teacher, student, center)
    assert not loss.requires_grad
    dino_loss(teacher, student, center).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, (*teacher, *student, center)))


@pytest.mark.parametrize("backend", ["cpu", "reference", TRITON])
def test_stability(backend):
    """Huge logits and one-hot rows stay finite and exact."""
    device = device_for(backend)
    teacher, student, center = _inputs(2, 3, 5, 40, device=device, scale=1e4)
    loss = _check(teacher, student, center.to(device), backend)
    assert torch.isfinite(loss)
    # every teacher row one-hot at the student's argmax
    s = torch.full((5, 40), -1e4, device=device)
    s[:, 3] = 1e4
    student = [s.clone().requires_grad_() for _ in range(3)]
    teacher = [s.clone() for _ in range(2)]
    loss = dino_loss(teacher, student, torch.zeros(40, device=device), backend=backend)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6 and all(torch.isfinite(x.grad).all() for x in student)


def test_bad_input():
    t, s, c = _inputs(2, 2, 4, 8)
    with pytest.raises(ValueError, match="teacher_out is empty"):
        dino_loss([], s, c)
    with pytest.raises(ValueError, match="student_out is empty"):
        dino_loss(t, (), c)
    with pytest.raises(TypeError, match="student_out must be a list"):
        dino_loss(t, 3, c)
    with pytest.raises(TypeError, match=r"teacher_out\[1\] must be a torch.Tensor"):
        dino_loss([t[0], 1.0], s, c)
    with pytest.raises(ValueError, match=r"student_out\[1\] has shape \(4, 9\) but teacher_out\[0\] "
                                         r"has \(4, 8\)"):
        dino_loss(t, [s[0], torch.randn(4, 9)], c)
    with pytest.raises(ValueError, match=r"student_out\[0\] has shape \(5, 8\)"):
        dino_loss(t, [torch.randn(5, 8), torch.randn(5, 8)], c)
    with pytest.raises(ValueError, match=r"student_out\[1\] is an empty group"):
        dino_loss(t, [s[0], torch.randn(0, 4, 8)], c)
    with pytest.raises(ValueError, match=r"student_out\[1\]\[0\] has shape \(4, 9\)"):
        dino_loss(t, [s[0], torch.randn(2, 4, 9)], c)
    with pytest.raises(ValueError, match=r"teacher_out\[0\] must be 2-D"):
        dino_loss([torch.randn(8)], s, c)
    with pytest.raises(ValueError, match=r"teacher_out\[0\] is empty"):
        dino_loss([torch.randn(0, 8)] * 2, [torch.randn(0, 8)] * 2, c)
    with pytest.raises(TypeError, match=r"student_out\[0\] must be a floating-point"):
        dino_loss(t, [torch.ones(4, 8, dtype=torch.int64)], c)
    with pytest.raises(TypeError, match=r"teacher_out\[1\] is torch.float64 but teacher_out\[0\] "
                                        r"is torch.float32"):
        dino_loss([t[0], t[1].double()], s, c)
    with pytest.raises(ValueError, match=r"student_out\[0\] is on meta but teacher_out\[0\] is "
                                         r"on cpu"):
        dino_loss(t, [torch.empty(4, 8, device="meta")], c)
    with pytest.raises(ValueError, match=r"center must have shape \(8,\), \(1, 8\) or \(1, 1, 8\)"):
        dino_loss(t, s, torch.zeros(1, 1, 9))
    with pytest.raises(ValueError, match="center must have shape"):
        dino_loss(t, s, torch.zeros(2, 8))
    with pytest.raises(TypeError, match="center must be a floating-point"):
        dino_loss(t, s, torch.zeros(8, dtype=torch.int32))
    with pytest.raises(TypeError, match="center must be a torch.Tensor"):
        dino_loss(t, s, None)
    with pytest.raises(ValueError, match="center is on meta"):
        dino_loss(t, s, torch.zeros(8, device="meta"))
    with pytest.raises(ValueError, match="center contains NaN"):
        dino_loss(t, s, torch.full((8,), float("nan")))
    with pytest.raises(ValueError, match="needs a pair of crops a != b: 1 teacher and 1 student"):
        dino_loss(t[:1], s[:1], c)
    for bad in (0.0, -0.04, float("nan"), float("inf"), torch.tensor(0.0), torch.tensor(-1.0)):
        with pytest.raises(ValueError, match="teacher_temp must be a positive finite number"):
            dino_loss(t, s, c, teacher_temp=bad)
    with pytest.raises(ValueError, match="teacher_temp must be a float or a 0-dim"):
        dino_loss(t, s, c, teacher_temp=torch.tensor([0.04]))
    with pytest.raises(TypeError, match="teacher_temp must be a float"):
        dino_loss(t, s, c, teacher_temp="0.04")
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="student_temp must be a positive finite number"):
            dino_loss(t, s, c, student_temp=bad)
    with pytest.raises(TypeError, match="student_temp must be a float"):
        dino_loss(t, s, c, student_temp=None)
    with pytest.raises(ValueError, match="backend must be one of"):
        dino_loss(t, s, c, backend="fast")
    for name, where in (("teacher_out[1]", 0), ("student_out[0]", 1)):
        for value in (float("nan"), float("inf")):
            tt, ss = [x.detach().clone() for x in t], [x.detach().clone() for x in s]
            (tt[1] if where == 0 else ss[0])[2, 3] = value
            with pytest.raises(ValueError, match=rf"{name[:-3]}\[{name[-2]}\] contains NaN or Inf"):
                dino_loss(tt, ss, c)
    with pytest.raises(ValueError, match="Unknown center_mode"):
        sslfast.DINOLoss(8, center_mode="median")
    with pytest.raises(ValueError, match="output_dim must be a positive int"):
        sslfast.DINOLoss(0)
    with pytest.raises(ValueError, match=r"teacher_out\[0\] has dimension 8 but this DINOLoss has "
                                         r"output_dim=16"):
        sslfast.DINOLoss(16)(t, s)
    with pytest.raises(ValueError, match=r"teacher_out\[0\] has dimension 8 but this DINOLoss has "
                                         r"output_dim=16"):
        sslfast.DINOLoss(16)([torch.stack(t)], [torch.stack(s)])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend):
    teacher, student, center = _inputs(2, 3, 4, 9)
    op = torch.ops.sslfast.dino_loss.default
    t_in = [x.unsqueeze(0) for x in teacher]
    s_in = [x.detach().unsqueeze(0).requires_grad_() for x in student]
    tt = torch.tensor(0.05)
    torch.library.opcheck(op, (t_in, s_in, center.view(-1), tt, 0.1, backend, True))
    torch.library.opcheck(op, ([torch.stack(teacher)], [torch.stack(s_in).squeeze(1).detach()],
                               center.view(-1), tt, 0.2, backend, False))
    torch.library.opcheck(torch.ops.sslfast.dino_loss_backward.default,
                          (t_in, [x.detach() for x in s_in], center.view(-1), tt, 0.1,
                           torch.empty(0), torch.empty(0), torch.tensor(1.5), "reference"))


@pytest.mark.triton
def test_opcheck_triton_two_groups():
    teacher, student, center = _inputs(2, 3, 4, 9, device=TRITON_DEVICE)
    s_in = [torch.stack([x.detach() for x in student[:2]]).requires_grad_(),
            student[2].detach().unsqueeze(0).requires_grad_()]
    tt = torch.tensor(0.05, device=TRITON_DEVICE)
    torch.library.opcheck(torch.ops.sslfast.dino_loss.default,
                          ([torch.stack(teacher)], s_in, center.view(-1), tt, 0.1, "triton", True))


def test_compile_fullgraph():
    teacher, student, center = _inputs(2, 3, 4, 9)
    f = torch.compile(lambda t, s, c: dino_loss(t, s, c, 0.05, 0.2, backend="cpu"),
                      fullgraph=True, backend="aot_eager")
    loss = f(teacher, student, center)
    loss.backward()
    ref, ref_grads = _reference(teacher, student, center, 0.05, 0.2)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student[1].grad.double(), ref_grads[1], rtol=1e-5, atol=1e-7)


def test_cpu_memory_has_no_pair_tensors():
    """T = 2, S = 10, N = 512, K = 8192: a (T, S, N, K) float32 tensor would be 320 MiB,
    the inputs are 192 MiB. Without gradients the loss holds only blocks of rows (16 MiB);
    with them, the gradient itself (and, in the backward, its product with the upstream
    gradient); lightly holds several stacked copies. (Resident-set growth: some MiB of
    allocator noise.)"""
    from sslfast._memory import peak_memory

    T, S, n, k = 2, 10, 512, 8192
    teacher, student, center = _inputs(T, S, n, k)
    unit = n * k * 4

    def forward():
        with torch.no_grad():
            return dino_loss(teacher, student, center)

    def step():
        dino_loss(teacher, student, center).backward()

    forward()  # warm-ups: the thread pool, first use of each kernel
    _, peak_fwd = peak_memory(forward, "cpu")
    if peak_fwd is None:
        pytest.skip("the OS cannot reset the RSS peak")
    step()
    for s in student:
        s.grad = None
    _, peak_step = peak_memory(step, "cpu")
    # Bounds with room for the allocator's noise in a long test session (it was flaky at
    # a sixth and 32 MiB); still a quarter of the pair tensor, and no stacked copies.
    assert peak_fwd < T * S * unit / 4, f"forward peak {peak_fwd / 2**20:.0f} MiB"
    assert peak_step < 2 * S * unit + (64 << 20), f"step peak {peak_step / 2**20:.0f} MiB"


# ---- lightly -------------------------------------------------------------------------------


@pytest.mark.parametrize("T,S", [(2, 2), (2, 6), (1, 3)])
def test_module_equals_lightly(T, S):
    """Loss, gradients and center over steps through the warmup and after, with an
    explicit teacher_temp too; then the state dicts interchange."""
    lightly_loss = pytest.importorskip("lightly.loss")
    k = 64
    kw = dict(output_dim=k, warmup_teacher_temp=0.02, teacher_temp=0.06,
              warmup_teacher_temp_epochs=3, student_temp=0.2, center_momentum=0.8)
    ours, theirs = sslfast.DINOLoss(**kw), lightly_loss.DINOLoss(**kw)
    for step, (epoch, tt) in enumerate([(0, None), (1, None), (2, None), (3, None), (None, None),
                                        (None, 0.03), (7, 0.05)]):
        teacher, student, _ = _inputs(T, S, 8, k, scale=0.5 + 0.25 * step)
        a = ours(teacher, student, teacher_temp=tt, epoch=epoch)
        ga = torch.autograd.grad(a, student)
        b = theirs(teacher, student, teacher_temp=tt, epoch=epoch)
        gb = torch.autograd.grad(b, student)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)
        assert ours.center.shape == theirs.center.shape == (1, 1, k)
        torch.testing.assert_close(ours.center, theirs.center, rtol=1e-5, atol=1e-7)
    fresh = lightly_loss.DINOLoss(**kw)
    fresh.load_state_dict(ours.state_dict())
    back = sslfast.DINOLoss(**kw)
    back.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(fresh.center, back.center, rtol=1e-5, atol=1e-7)


def test_module_center_from_list_or_tensor():
    loss = sslfast.DINOLoss(5, center_momentum=0.5)
    x = torch.randn(2, 3, 5)
    loss.update_center(x)
    torch.testing.assert_close(loss.center, 0.5 * x.mean(dim=(0, 1), keepdim=True))
    loss.update_center(list(x.unbind(0)))
    torch.testing.assert_close(loss.center, 0.75 * x.mean(dim=(0, 1), keepdim=True))


# ---- two processes ---------------------------------------------------------------------------


def _dist_inputs(world):
    g = torch.Generator().manual_seed(7)
    teacher = [torch.randn(world * 3, 16, generator=g) for _ in range(2)]
    student = [torch.randn(world * 3, 16, generator=g) for _ in range(4)]
    return teacher, student


def _dist_worker(rank, world):
    teacher, student = _dist_inputs(world)
    rows = slice(3 * rank, 3 * rank + 3)
    loss_fn = sslfast.DINOLoss(16, center_momentum=0.7)
    losses = [loss_fn([t[rows] for t in teacher], [s[rows] for s in student]) for _ in range(2)]
    return loss_fn.center, torch.stack(losses)


def test_center_all_reduced_over_ranks(tmp_path):
    """The center follows the mean over all ranks' rows: after each step it equals the
    one of a single process on the concatenated batch."""
    per_rank = spawn_gloo(_dist_worker, 2, tmp_path)
    teacher, student = _dist_inputs(2)
    single = sslfast.DINOLoss(16, center_momentum=0.7)
    centers = [single.center.clone()]
    for _ in range(2):
        single(teacher, student)
        centers.append(single.center.clone())
    for rank, (center, losses) in enumerate(per_rank):
        torch.testing.assert_close(center, centers[2], rtol=1e-6, atol=1e-7)
        rows = slice(3 * rank, 3 * rank + 3)
        for step in range(2):  # each step's loss used the center of before it
            expected = dino_loss([t[rows] for t in teacher], [s[rows] for s in student],
                                 centers[step])
            torch.testing.assert_close(losses[step], expected, rtol=1e-6, atol=1e-7)


# ---- Triton kernels (the interpreter on CPU) ---------------------------------------------

TRITON_CASES = [(2, 2, 1, 1), (2, 3, 3, 77), (1, 3, 2, 33), (3, 2, 2, 100)]


@pytest.mark.triton
@pytest.mark.parametrize("T,S,n,k", TRITON_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_kernels(T, S, n, k, dtype, splits):
    """The launchers at a 16-wide block (K not a multiple of it), with the columns cut
    into splits: lse, loss terms and gradient against float64."""
    from sslfast.kernels.dino import dino_backward, dino_forward

    teacher, student, center = _inputs(T, S, n, k, dtype, TRITON_DEVICE)
    t, s = torch.stack(teacher), torch.stack([x.detach() for x in student])
    cfg = {"BLOCK_K": 16, "num_warps": 4}
    lse_t, lse_s, term = dino_forward(t, s, center, 1 / 0.05, 0.2, config=cfg, splits=splits)
    n_terms = T * S - min(T, S)
    ds = dino_backward(t, s, center, torch.tensor(1 / 0.05, device=TRITON_DEVICE), 0.2, lse_t,
                       lse_s, torch.tensor(2.5, device=TRITON_DEVICE), config=cfg, splits=splits)
    t64, s64, c64 = t.double().cpu(), s.double().cpu(), center.double().cpu().view(-1)
    log2e = 1.4426950408889634  # the lse are in log2 units
    torch.testing.assert_close(lse_t.cpu().double(),
                               torch.logsumexp((t64 - c64) / 0.05, -1) * log2e, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lse_s.cpu().double(), torch.logsumexp(s64 / 0.2, -1) * log2e,
                               rtol=1e-6, atol=1e-5)
    ref, ref_grads = _reference(list(t64), list(s64.unbind(0)), c64, 0.05, 0.2)
    torch.testing.assert_close(term.sum().cpu().double() / (n_terms * n), ref.detach(),
                               rtol=1e-5, atol=1e-5)
    ref_ds = 2.5 * torch.stack(ref_grads)
    tol = TOLERANCES[dtype][0]
    assert ds.dtype == dtype and ds.shape == s.shape
    scale = max(float(ref_ds.abs().max()), _natural_grad(teacher, student, 0.2, 2.5))
    torch.testing.assert_close(ds.cpu().double(), ref_ds, rtol=tol, atol=tol * scale)


@pytest.mark.triton
@pytest.mark.parametrize("T,S,n,k", TRITON_CASES[1:])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_triton_backend(T, S, n, k, dtype):
    """The functional form on the triton backend (default block), autograd included;
    the teacher temperature as a tensor on the device."""
    teacher, student, center = _inputs(T, S, n, k, dtype, TRITON_DEVICE)
    _check(teacher, student, center, "triton", tt=torch.tensor(0.05, device=TRITON_DEVICE))


@pytest.mark.triton
def test_triton_backend_takes_crop_tensors_as_given():
    """(crops, N, K) tensors go to the kernels without a stack (a strided one made
    contiguous there): the same loss and gradient as the lists of crops."""
    teacher, student, center = _inputs(2, 3, 5, 40, torch.float32, TRITON_DEVICE)
    t = torch.stack(teacher)
    s = torch.stack([x.detach() for x in student], 1).transpose(0, 1).requires_grad_()
    assert not s.is_contiguous()
    loss = dino_loss(t, s, center, backend="triton")
    crops = [x.detach().clone().requires_grad_() for x in s.unbind(0)]
    loss_list = dino_loss(list(t), crops, center, backend="triton")
    torch.testing.assert_close(loss, loss_list)
    (g,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(g, torch.stack(torch.autograd.grad(loss_list, crops)))


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("splits", [1, 2])
def test_triton_kernels_two_student_groups(dtype, splits):
    """Student crops given as two groups: the same lse, terms and gradient, bit for bit,
    as the same crops stacked into one tensor."""
    from sslfast.kernels.dino import dino_backward, dino_forward

    teacher, student, center = _inputs(2, 5, 3, 40, dtype, TRITON_DEVICE)
    t, s = torch.stack(teacher), torch.stack([x.detach() for x in student])
    groups = [s[:2].clone(), s[2:].clone()]
    cfg = {"BLOCK_K": 16, "num_warps": 4}
    one = dino_forward(t, s, center, 20.0, 0.2, config=cfg, splits=splits)
    two = dino_forward(t, groups, center, 20.0, 0.2, config=cfg, splits=splits)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    ds_one = dino_backward(t, s, center, 20.0, 0.2, *one[:2], 1.5, config=cfg, splits=splits)
    ds_two = dino_backward(t, groups, center, 20.0, 0.2, *one[:2], 1.5, config=cfg,
                           splits=splits)
    assert torch.equal(ds_one, ds_two)


@pytest.mark.triton
@pytest.mark.parametrize("T,S", [(2, 5), (3, 2), (1, 3)])
def test_triton_kernels_split_invariant(T, S):
    """Programs per row walk shares of the column blocks; each block's statistics are
    merged in one order, so any split gives the same lse, terms and gradient, bit for
    bit (7 blocks of 16: splits of 1, 2 and 3 blocks, and more splits than blocks)."""
    from sslfast.kernels.dino import dino_backward, dino_forward

    teacher, student, center = _inputs(T, S, 3, 100, torch.float32, TRITON_DEVICE)
    t, s = torch.stack(teacher), torch.stack([x.detach() for x in student])
    cfg = {"BLOCK_K": 16, "num_warps": 4}
    one = dino_forward(t, s, center, 20.0, 0.2, config=cfg, splits=1)
    ds_one = dino_backward(t, s, center, 20.0, 0.2, *one[:2], 1.5, config=cfg, splits=1)
    for splits in (3, 9):
        out = dino_forward(t, s, center, 20.0, 0.2, config=cfg, splits=splits)
        for a, b in zip(one, out):
            assert torch.equal(a, b), splits
        ds = dino_backward(t, s, center, 20.0, 0.2, *one[:2], 1.5, config=cfg, splits=splits)
        assert torch.equal(ds_one, ds), splits


@pytest.mark.parametrize("backend", ["cpu", "reference", TRITON])
def test_crop_groups(backend, monkeypatch):
    """A list of (c, N, K) crop groups and (N, K) crops: the loss and gradients of the
    same crops one by one; the triton backend reads two student groups where they are."""
    device = device_for(backend)
    teacher, student, center = _inputs(2, 5, 3, 24, torch.float32, device)
    globals_ = torch.stack([x.detach() for x in student[:2]]).requires_grad_()
    locals_ = torch.stack([x.detach() for x in student[2:]]).requires_grad_()
    seen = []
    if backend == "triton":
        from sslfast.kernels import dino as kernels

        forward = kernels.dino_forward

        def spy(t, s, *args, **kw):
            seen.append([g.data_ptr() for g in s])
            return forward(t, s, *args, **kw)

        monkeypatch.setattr(kernels, "dino_forward", spy)
    loss = dino_loss([teacher[0][None], teacher[1]], [globals_, locals_], center,
                     backend=backend)
    ref = dino_loss(teacher, student, center, backend=backend)
    torch.testing.assert_close(loss, ref)
    grads = torch.autograd.grad(loss, [globals_, locals_])
    ref_grads = torch.autograd.grad(ref, student)
    torch.testing.assert_close(torch.cat(grads), torch.stack(ref_grads))
    if backend == "triton":
        assert seen[0] == [globals_.data_ptr(), locals_.data_ptr()]
        # three groups are joined into one copy
        dino_loss(teacher, [globals_, locals_[:1], locals_[1:]], center, backend=backend)
        assert len(seen[1]) == 1


@pytest.mark.triton
def test_triton_launcher_errors():
    from sslfast.kernels.dino import dino_forward

    t = torch.randn(2, 3, 8, device=TRITON_DEVICE)
    with pytest.raises(TypeError, match="student must be float32, bfloat16 or float16"):
        dino_forward(t, t.double(), torch.zeros(8, device=TRITON_DEVICE), 10.0, 0.1)
    with pytest.raises(ValueError, match="center has 9 elements"):
        dino_forward(t, t, torch.zeros(9, device=TRITON_DEVICE), 10.0, 0.1)
    with pytest.raises(ValueError, match="BLOCK_K"):
        dino_forward(t, t, torch.zeros(8, device=TRITON_DEVICE), 10.0, 0.1, config={"BLOCK_K": 24})
    with pytest.raises(ValueError, match="one or two crop groups, got 3"):
        dino_forward(t, [t, t, t], torch.zeros(8, device=TRITON_DEVICE), 10.0, 0.1)
    with pytest.raises(TypeError, match="student groups must share a dtype"):
        dino_forward(t, [t, t.half()], torch.zeros(8, device=TRITON_DEVICE), 10.0, 0.1)
    with pytest.raises(ValueError, match=r"student\[1\] \(2, 4, 8\)"):
        dino_forward(t, [t, torch.randn(2, 4, 8, device=TRITON_DEVICE)],
                     torch.zeros(8, device=TRITON_DEVICE), 10.0, 0.1)
    with pytest.raises(TypeError, match="triton backend takes float32"):
        dino_loss(list(t.double()), list(t.double()), torch.zeros(8, device=TRITON_DEVICE),
                  backend="triton")


# ---- GPU -----------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("n,dtype", [(64, torch.bfloat16), (64, torch.float32),
                                     (256, torch.bfloat16), (7, torch.float16)])
def test_cuda_dino_sizes(n, dtype):
    """DINO's sizes: K = 65536, 2 global + 8 local crops (auto splits at small N)."""
    teacher, student, center = _inputs(2, 10, n, 65536, dtype, "cuda")
    _check(teacher, student, center, "auto", tt=torch.tensor(0.04, device="cuda"))


@pytest.mark.cuda
def test_cuda_module_equals_lightly_and_no_host_sync():
    from tests.utils import assert_no_host_sync

    lightly_loss = pytest.importorskip("lightly.loss")
    k = 4096
    ours = sslfast.DINOLoss(k, warmup_teacher_temp_epochs=3).cuda()
    theirs = lightly_loss.DINOLoss(k, warmup_teacher_temp_epochs=3).cuda()
    for epoch in range(5):
        teacher, student, _ = _inputs(2, 6, 32, k, device="cuda")
        a = ours(teacher, student, epoch=epoch)
        b = theirs(teacher, student, epoch=epoch)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for x, y in zip(torch.autograd.grad(a, student), torch.autograd.grad(b, student)):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * float(y.abs().max()))
        torch.testing.assert_close(ours.center, theirs.center, rtol=1e-5, atol=1e-7)
    assert_no_host_sync(lambda: ours(teacher, student, epoch=1).backward())


@pytest.mark.cuda
def test_cuda_memory():
    """Beyond the inputs: the two stacks (saved for the backward) and the gradient."""
    from sslfast._memory import peak_memory

    T, S, n, k = 2, 10, 64, 65536
    teacher, student, center = _inputs(T, S, n, k, torch.bfloat16, "cuda")
    step = lambda: dino_loss(teacher, student, center).backward()  # noqa: E731
    step()
    for s in student:
        s.grad = None
    _, peak = peak_memory(step, "cuda")
    unit = n * k * 2
    assert peak < (T + 2 * S) * unit * 1.1 + (8 << 20), f"peak {peak / 2**20:.0f} MiB"
    # A (T, N, K) teacher and two student groups (DINO's global and local crops) are
    # read where they are: beyond the inputs only the gradient.
    t_all = torch.stack(teacher)
    groups = [torch.stack([x.detach() for x in part]).requires_grad_()
              for part in (student[:2], student[2:])]
    step = lambda: dino_loss(t_all, groups, center).backward()  # noqa: E731
    step()
    for g in groups:
        g.grad = None
    _, peak = peak_memory(step, "cuda")
    assert peak < S * unit * 1.1 + (8 << 20), f"peak {peak / 2**20:.0f} MiB (groups)"
