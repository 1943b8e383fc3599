"""DINO loss — SEMANTICS.md §7, lightly.loss.DINOLoss's loss (the center update is
the module's, ``sslfast.losses.DINOLoss``).

With P_a = softmax((t_a - c) / tau_t) and x_b = s_b / tau_s, sum_k P_a = 1 turns each
pair's cross-entropy into lse(x_b) - P_a . x_b, so with Q_b = sum_{a != b} P_a and
count_b = #{a != b}:

    loss = sum_b sum_n (count_b lse(x_bn) - Q_bn . x_bn) / (n_terms N)
    d loss / d s_b = (count_b softmax(x_b) - Q_b) / (tau_s n_terms N)

n_terms = T S - min(T, S). Nothing per crop pair is built. The teacher gets no
gradient (DINO's teacher is an EMA model run under no_grad), nor does the center.

Backends: ``triton`` (``sslfast/kernels/dino.py``: one pass over K per row in the
forward and one in the backward; the student crops read where they are when they come
as one or two (crops, N, K) groups, else stacked), ``cpu`` (blocks of rows, the gradient
computed in the same pass; each block holds about ``_CPU_BLOCK_ELEMS`` elements of
float32 temporaries; the crops are not stacked), ``reference`` (the float64
definition). Registered as the custom ops ``sslfast::dino_loss`` and
``sslfast::dino_loss_backward`` with fake implementations and autograd.
"""

import numbers
from typing import List, Tuple  # noqa: UP035 - torch.library reads these

import torch

from sslfast._backend import resolve_backend, without_autocast
from sslfast.ops._contrastive import check_features, check_same_shape, check_scalar, scale_tensor
from sslfast.reference.dino import dino_reference

_CPU_BLOCK_ELEMS = 1 << 22  # 16 MiB of float32 temporaries per block of rows
IMPLEMENTED = ("triton", "cpu", "reference")


def _kernels():
    from sslfast.kernels import dino as kernels  # imports triton: only when used

    return kernels


def _compute_dtype(*xs):
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _crops(stacks):
    """The (N, K) crops of a list of (c, N, K) crop stacks."""
    return [c for st in stacks for c in st.unbind(0)]


def _joined(stacks, most=1):
    """The stacks as given if there are at most ``most``, else joined into one (a copy)."""
    return stacks if len(stacks) <= most else [torch.cat(stacks)]


def _n_terms(T, S):
    return T * S - min(T, S)


# ---- CPU: blocked, memory-lean ---------------------------------------------------------


def _cpu_forward(teacher, student, center, teacher_temp, student_temp, need_grad):
    """(loss, d loss / d student (S, N, K) in the student dtype, or None)."""
    T, S = len(teacher), len(student)
    N, K = student[0].shape
    ct = _compute_dtype(teacher[0], student[0])
    # exp() of arguments below about -87 (float32) takes a slow path on x86, and tiny
    # results turn denormal further on: exponents are floored at e^-60 (e^-650), far
    # below the rounding of anything they are added to.
    floor = -60.0 if ct == torch.float32 else -650.0
    c, tt = center.to(ct), teacher_temp.to(ct)
    inv_ts = 1.0 / student_temp
    coef = inv_ts / (_n_terms(T, S) * N)  # d loss / d s = coef (count softmax - Q)
    grad = torch.empty(S, N, K, dtype=student[0].dtype) if need_grad else None
    total = torch.zeros((), dtype=ct)
    step = max(1, _CPU_BLOCK_ELEMS // ((T + 4) * K))  # p (T rows), p_sum, q, x, q * x
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        p = torch.empty(T, r1 - r0, K, dtype=ct)
        for a, t in enumerate(teacher):
            torch.sub(t[r0:r1], c, out=p[a])
        p.div_(tt)  # a division, as lightly: (t - c) / tau_t is magnified in the exponent
        p.sub_(p.amax(dim=-1, keepdim=True)).clamp_(min=floor).exp_()
        p.div_(p.sum(dim=-1, keepdim=True))
        p_sum = p.sum(dim=0)
        q, x = torch.empty_like(p_sum), torch.empty_like(p_sum)
        for b, s in enumerate(student):
            count = T - (b < T)
            q_b = torch.sub(p_sum, p[b], out=q) if b < T else p_sum
            x.copy_(s[r0:r1]).mul_(inv_ts)
            m = x.amax(dim=-1, keepdim=True)
            x.sub_(m)
            # count lse - Q.x = count log l_sum - Q.(x - m), l_sum = sum exp(x - m)
            d = torch.linalg.vecdot(q_b, x)
            l_sum = x.clamp_(min=floor).exp_().sum(dim=-1)
            total += (count * l_sum.log() - d).sum()
            if need_grad:  # x holds exp(x - m) = l_sum softmax(x)
                torch.sub(x.mul_((count * coef / l_sum).unsqueeze(-1)), q_b, alpha=coef,
                          out=grad[b, r0:r1])
    return total / (_n_terms(T, S) * N), grad


# ---- custom ops ------------------------------------------------------------------------


@torch.library.custom_op("sslfast::dino_loss", mutates_args=())
@without_autocast
def dino_loss_op(
    teacher: List[torch.Tensor],  # noqa: UP006
    student: List[torch.Tensor],  # noqa: UP006
    center: torch.Tensor,
    teacher_temp: torch.Tensor,
    student_temp: float,
    backend: str,
    need_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: UP006
    """(loss, lse_t (T, N), lse_s (S, N), grad1). teacher, student: lists of (c, N, K)
    crop stacks; center (K,); teacher_temp a 0-dim tensor. The lse (float32, log2
    units) are the ``triton`` backward's; grad1 the ``cpu`` backend's d loss / d student
    (S, N, K) in the student dtype, computed in the forward when need_grad. What a
    backend does not use is 0-element."""
    ct = _compute_dtype(teacher[0], student[0])
    empty = lambda: center.new_empty(0, dtype=ct)  # noqa: E731
    if backend == "cpu":
        loss, grad = _cpu_forward(_crops(teacher), _crops(student), center, teacher_temp,
                                  student_temp, need_grad)
        return loss, empty(), empty(), grad if grad is not None else student[0].new_empty(0)
    if backend == "triton":
        (t,), s = _joined(teacher), _joined(student, 2)
        lse_t, lse_s, term = _kernels().dino_forward(t, s, center, 1.0 / teacher_temp.float(),
                                                     student_temp)
        loss = term.sum() / (_n_terms(t.shape[0], lse_s.shape[0]) * t.shape[1])
        return loss, lse_t, lse_s, student[0].new_empty(0)
    loss = dino_reference([x.double() for x in _crops(teacher)],
                          [x.double() for x in _crops(student)], center.double(),
                          teacher_temp.double(), student_temp)
    return loss.to(ct), empty(), empty(), student[0].new_empty(0)


@dino_loss_op.register_fake
def _(teacher, student, center, teacher_temp, student_temp, backend, need_grad):
    ct = _compute_dtype(teacher[0], student[0])
    T, S = sum(x.shape[0] for x in teacher), sum(x.shape[0] for x in student)
    N, K = student[0].shape[1:]
    lse = backend == "triton"
    grad = backend == "cpu" and need_grad
    return (
        center.new_empty((), dtype=ct),
        center.new_empty((T, N) if lse else (0,), dtype=ct),
        center.new_empty((S, N) if lse else (0,), dtype=ct),
        student[0].new_empty((S, N, K) if grad else (0,)),
    )


@torch.library.custom_op("sslfast::dino_loss_backward", mutates_args=())
@without_autocast
def dino_loss_backward(
    teacher: List[torch.Tensor],  # noqa: UP006
    student: List[torch.Tensor],  # noqa: UP006
    center: torch.Tensor,
    teacher_temp: torch.Tensor,
    student_temp: float,
    lse_t: torch.Tensor,
    lse_s: torch.Tensor,
    grad: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """d (grad * loss) / d student, (S, N, K) in the student dtype (``triton``: from the
    forward's lse; ``reference``: the definition's derivative, pair by pair, float64)."""
    if backend == "triton":
        return _kernels().dino_backward(_joined(teacher)[0], _joined(student, 2), center,
                                        1.0 / teacher_temp.float(), student_temp, lse_t, lse_s,
                                        grad.float())
    # The definition's derivative, per pair, dense float64 (autograd is off in here):
    # d/ds_b of -P_a . log_softmax(s_b / tau_s) is (softmax(s_b / tau_s) - P_a) / tau_s.
    t64, s64 = _crops(teacher), _crops(student)
    c64, tt64 = center.double(), teacher_temp.double()
    p = [torch.softmax((t.double() - c64) / tt64, dim=-1) for t in t64]
    scale = grad.double() / (student_temp * _n_terms(len(t64), len(s64)) * s64[0].shape[0])
    ds = []
    for b, s in enumerate(s64):
        sm = torch.softmax(s.double() / student_temp, dim=-1)
        ds.append(sum((sm - pa for a, pa in enumerate(p) if a != b), torch.zeros_like(sm)))
    return (torch.stack(ds) * scale).to(student[0].dtype)


@dino_loss_backward.register_fake
def _(teacher, student, center, teacher_temp, student_temp, lse_t, lse_s, grad, backend):
    S = sum(x.shape[0] for x in student)
    return student[0].new_empty((S, *student[0].shape[1:]))


def _setup_context(ctx, inputs, output):
    teacher, student, center, teacher_temp, student_temp, backend, need_grad = inputs
    _, lse_t, lse_s, grad1 = output
    ctx.eager = backend == "cpu" and need_grad
    ctx.n_teacher, ctx.sizes = len(teacher), [x.shape[0] for x in student]
    ctx.student_temp, ctx.backend, ctx.dtype = student_temp, backend, student[0].dtype
    # Eager: grad1 is all the backward needs.
    saved = [grad1] if ctx.eager else [*teacher, *student, center, teacher_temp, lse_t, lse_s]
    ctx.save_for_backward(*saved)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_unused):
    no_teacher = [None] * ctx.n_teacher
    if grad_loss is None:
        return no_teacher, [None] * len(ctx.sizes), None, None, None, None, None
    if ctx.eager:
        (grad1,) = ctx.saved_tensors
        ds = grad1 * grad_loss
    else:
        *crops, center, teacher_temp, lse_t, lse_s = ctx.saved_tensors
        teacher, student = crops[:ctx.n_teacher], crops[ctx.n_teacher:]
        ds = dino_loss_backward(teacher, student, center, teacher_temp, ctx.student_temp, lse_t,
                                lse_s, grad_loss, ctx.backend)
    return no_teacher, list(ds.to(ctx.dtype).split(ctx.sizes)), None, None, None, None, None


torch.library.register_autograd("sslfast::dino_loss", _backward, setup_context=_setup_context)


# ---- the functional form ---------------------------------------------------------------


def _crop_list(x, name):
    """(named crops [(name, (N, K) tensor)], groups [(c, N, K) tensors]) of a list of
    (N, K) crops and (c, N, K) crop groups, or of one (crops, N, K) tensor. Each crop
    is a view of its group; the groups are views of what was given."""
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        return [(f"{name}[{i}]", c) for i, c in enumerate(x.unbind(0))], [x]
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"{name} must be a list of (N, K) tensors or (crops, N, K) groups (or "
                        f"one (crops, N, K) tensor), got {type(x).__name__}")
    if len(x) == 0:
        raise ValueError(f"{name} is empty: it needs at least one (N, K) tensor")
    crops, groups = [], []
    for i, g in enumerate(x):
        if isinstance(g, torch.Tensor) and g.dim() == 3:
            if g.shape[0] == 0:
                raise ValueError(f"{name}[{i}] is an empty group (shape {tuple(g.shape)})")
            crops += [(f"{name}[{i}][{j}]", c) for j, c in enumerate(g.unbind(0))]
            groups.append(g)
        else:  # checked as a crop by _check_crop
            crops.append((f"{name}[{i}]", g))
            groups.append(g.unsqueeze(0) if isinstance(g, torch.Tensor) and g.dim() == 2 else g)
    return crops, groups


def _check_crop(x, name, first, first_name, teacher0):
    """x: a floating (N, K) tensor, N, K >= 1, of first's dtype, on teacher_out[0]'s
    device and of its shape. Finiteness is checked only if the loss is not finite."""
    if isinstance(x, torch.Tensor) and x.dim() == 2 and 0 in x.shape:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    check_features(x, name, first, first_name, finite=False)
    if x.device != teacher0.device:
        raise ValueError(f"{name} is on {x.device} but teacher_out[0] is on {teacher0.device}")
    check_same_shape(x, name, teacher0, "teacher_out[0]")


def _check_center(center, like):
    if not isinstance(center, torch.Tensor):
        raise TypeError(f"center must be a torch.Tensor, got {type(center).__name__}")
    if not center.is_floating_point():
        raise TypeError(f"center must be a floating-point tensor, got {center.dtype}")
    k = like.shape[1]
    if tuple(center.shape) not in ((k,), (1, k), (1, 1, k)):
        raise ValueError(f"center must have shape ({k},), (1, {k}) or (1, 1, {k}) for outputs "
                         f"of dimension K={k}, got {tuple(center.shape)}")
    if center.device != like.device:
        raise ValueError(f"center is on {center.device} but the outputs are on {like.device}")
    if center.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(center).all()):
            raise ValueError("center contains NaN or Inf")


def dino_loss(teacher_out, student_out, center, teacher_temp=0.04, student_temp=0.1,
              backend="auto"):
    """DINO's cross-entropy between the centered, sharpened teacher crops and the
    student crops, over every pair (teacher a, student b) with a != b, averaged over
    pairs and rows (lightly's DINOLoss without its center update). No (T, S, N, K)
    or per-pair (N, K) tensor is built.

    teacher_out: T crops, student_out: S crops, each given as a list of (N, K) tensors
    and (c, N, K) groups of crops (e.g. one per crop resolution), or as one (crops, N,
    K) tensor; all of one device, each side of one float dtype. The triton backend
    reads the teacher and up to two student groups where they are (more are joined
    into one copy). center: K elements, shape (K,), (1, K) or (1, 1, K). teacher_temp: a
    float or a 0-dim tensor (no host sync; a CPU tensor is checked), > 0;
    student_temp: a float > 0. Gradients flow to the student crops only.
    """
    teacher_named, teacher_groups = _crop_list(teacher_out, "teacher_out")
    student_named, student_groups = _crop_list(student_out, "student_out")
    for named in (teacher_named, student_named):
        for name, x in named:
            _check_crop(x, name, named[0][1], named[0][0], teacher_named[0][1])
    teacher, student = [x for _, x in teacher_named], [x for _, x in student_named]
    T, S = len(teacher), len(student)
    if _n_terms(T, S) == 0:
        raise ValueError(f"the DINO loss needs a pair of crops a != b: {T} teacher and {S} "
                         "student crop(s) leave none")
    _check_center(center, teacher[0])
    if isinstance(student_temp, bool) or not isinstance(student_temp, numbers.Real):
        raise TypeError(f"student_temp must be a float, got {type(student_temp).__name__}")
    check_scalar(float(student_temp), "student_temp", positive=True)
    like = student[0] if student[0].dtype == torch.float64 else teacher[0]
    tt = scale_tensor(teacher_temp, "teacher_temp", like, invert=False, positive=True).detach()
    name = resolve_backend(backend, teacher[0].device, "dino_loss", IMPLEMENTED,
                           gpu_default="triton")
    if name == "triton" and torch.float64 in (teacher[0].dtype, student[0].dtype):
        raise TypeError("the triton backend takes float32/bfloat16/float16 outputs; "
                        "use backend='cpu' or 'reference' for float64")
    teacher = [x.detach() for x in teacher]
    if name == "triton":  # the kernels take (crops, N, K) groups
        t_in, s_in = [x.detach() for x in teacher_groups], student_groups
    else:
        t_in, s_in = [x.unsqueeze(0) for x in teacher], [x.unsqueeze(0) for x in student]
    need_grad = torch.is_grad_enabled() and any(x.requires_grad for x in student)
    # Saved for the backward as they are: changing the center in place before the
    # backward is an autograd error (DINOLoss replaces its center instead).
    center = center.detach().reshape(-1)
    loss = dino_loss_op(t_in, s_in, center, tt, float(student_temp), name, need_grad)[0]
    # NaN / Inf in the inputs shows in the loss: only then are they looked for (on the
    # CPU, where reading the loss costs no sync), to name the argument.
    if loss.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(loss)):
            for name, x in teacher_named + student_named:
                if not bool(torch.isfinite(x).all()):
                    raise ValueError(f"{name} contains NaN or Inf")
    return loss
