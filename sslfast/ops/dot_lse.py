"""The core of the contrastive losses: a row log-sum-exp of scaled dot products,
without ever holding the R x C matrix.

    lse_i = logsumexp( { scale * q_i . k_j : j != i + exclude_offset } U { extra_i } )

Backends: ``triton`` (``sslfast/kernels/dot_lse.py``; CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``), ``cpu`` (blocks of rows against all
columns with the CPU's matmul, the gradients of the mean computed in the same
pass; each block holds at most ``_CPU_BLOCK_ELEMS`` logits), ``reference`` (dense).

Triton also has ``sslfast/kernels/dot_lse_pair.py``: both directions of one
logit matrix with each tile visited once, used for NT-Xent on one process (the
symmetric Z Z^T: only the tile pairs on and above the diagonal) and for CLIP.

Registered as the custom ops ``sslfast::dot_lse_mean`` (one row set against one
column set), ``sslfast::dot_lse_pair_mean`` (CLIP's two directions over one
logit matrix), ``sslfast::dot_lse_backward`` and ``sslfast::dot_lse_pair_backward``,
with fake implementations and autograd, so the losses built on them trace under
``torch.compile``.
"""

import math
from typing import Optional, Tuple

import torch

from sslfast._backend import without_autocast
from sslfast.reference.dot_lse import dot_lse_reference

_CPU_BLOCK_ELEMS = 1 << 22  # 16 MiB of float32 logits per block
IMPLEMENTED = ("triton", "cpu", "reference")


def _kernels():
    from sslfast.kernels import dot_lse as kernels  # imports triton: only when used

    return kernels


def _pair_kernels():
    from sslfast.kernels import dot_lse_pair as kernels  # imports triton: only when used

    return kernels


# ---- CPU: blocked, memory-lean ---------------------------------------------------


def _row_blocks(r, c):
    step = max(1, _CPU_BLOCK_ELEMS // max(c, 1))
    return [(r0, min(r, r0 + step)) for r0 in range(0, r, step)]


def _exclusion(r0, r1, c, exclude_offset, device):
    """(block-local row indices, column indices) of the excluded entries."""
    rows = torch.arange(r0, r1, device=device)
    cols = rows + exclude_offset
    ok = (cols >= 0) & (cols < c)
    return (rows - r0)[ok], cols[ok]


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _cpu_forward(q, k, scale, exclude_offset, extra, need_dq=False, need_dk=False, need_ds=False):
    """lse, and, when asked, the gradients of mean_i(lse_i) computed on the way
    (eager: each block's softmax is final once its row is done, so the
    backward needs no second pass; the loss's upstream gradient is a scalar)."""
    ct = _compute_dtype(q)
    qf, kf, s = q.to(ct), k.to(ct), scale.to(ct)
    r, c = q.shape[0], k.shape[0]
    lse = torch.empty(r, dtype=ct, device=q.device)
    dq = torch.empty(r, q.shape[1], dtype=ct) if need_dq else None
    dk = torch.zeros(c, k.shape[1], dtype=ct) if need_dk else None
    ds = torch.zeros((), dtype=ct)
    for r0, r1 in _row_blocks(r, c):
        logits = torch.mm(qf[r0:r1], kf.t()).mul_(s)
        excluded = None
        if exclude_offset is not None:
            excluded = _exclusion(r0, r1, c, exclude_offset, q.device)
            logits[excluded] = float("-inf")
        m = logits.amax(dim=1)
        if extra is not None:
            m = torch.maximum(m, extra[r0:r1].to(ct))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.sub(logits, m[:, None]).exp_() if need_ds else logits.sub_(m[:, None]).exp_()
        total = p.sum(dim=1)
        if extra is not None:
            total += (extra[r0:r1].to(ct) - m).exp()
        lse[r0:r1] = torch.log(total).add_(m)
        if not (need_dq or need_dk or need_ds):
            continue
        # d mean(lse) / d logits (a row with no candidates has none)
        p.div_(torch.where(total > 0, total, torch.ones_like(total))[:, None] * r)
        if need_dq:
            torch.mm(p, kf, out=dq[r0:r1]).mul_(s)
        if need_dk:
            dk.addmm_(p.t(), qf[r0:r1])
        if need_ds:  # sum P * logits / s, the excluded entries (-inf) left out
            if excluded is not None:
                logits[excluded] = 0.0
            ds += logits.mul_(p).sum() / s
    if need_dk:
        dk.mul_(s)
    return lse, dq, dk, ds


def _triangle_blocks(r):
    """Row blocks [r0, r1) of a symmetric r x r matrix, each against the columns from r0
    on (the diagonal block and the blocks right of it): at most _CPU_BLOCK_ELEMS logits."""
    r0 = 0
    while r0 < r:
        r1 = r0 + max(1, min(r - r0, _CPU_BLOCK_ELEMS // (r - r0)))
        yield r0, r1
        r0 = r1


def _fold(run_max, run_sum, part_max, part_sum):
    """Fold partial sums of exp(logits - part_max) into running (max, sum) vectors in
    place; part_max a vector or a 0-dim tensor, -inf where a part is empty."""
    new = torch.maximum(run_max, part_max)
    shift = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    run_sum.mul_(torch.exp(run_max - shift)).add_(part_sum * torch.exp(part_max - shift))
    run_max.copy_(new)


def _online_update(run_max, run_sum, logits, dim):
    """Fold a block of logits into running (max, sum) vectors in place, reducing over
    dim (1: the block's rows, 0: its columns), each against its own maximum."""
    m = logits.amax(dim=dim)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    _fold(run_max, run_sum, m, torch.sub(logits, shift.unsqueeze(dim)).exp_().sum(dim=dim))


# A block takes one exponential per logit for its rows and its columns when its
# entries' scale differs by less than e^_ONE_EXP_RANGE (float32's normal range
# reaches e^-87); else two, each against its own row's or column's maximum.
_ONE_EXP_RANGE = {torch.float32: 60.0, torch.float64: 600.0}


def _block_lse_update(run_max, run_sum, logits, b, floor):
    """Fold a block of rows (logits (B, C'), the first b columns the diagonal block)
    into its rows' running (max, sum) and, right of the diagonal block, its columns'.
    One exponential per logit, exp(logits - c) with c the block's maximum, where every
    row's and column's partial sum stays >= floor (its largest term is then at most
    -ln(floor) below c, so nothing it needs is flushed); else the block again with
    each row's and column's own maximum."""
    c = logits.max()
    if bool(torch.isfinite(c)):
        e = torch.sub(logits, c).exp_()
        rows, cols = e.sum(dim=1), e[:, b:].sum(dim=0)
        if bool(rows.min() >= floor) and (cols.numel() == 0 or bool(cols.min() >= floor)):
            _fold(run_max[:b], run_sum[:b], c, rows)
            _fold(run_max[b:], run_sum[b:], c, cols)
            return
    _online_update(run_max[:b], run_sum[:b], logits, 1)
    if logits.shape[1] > b:
        _online_update(run_max[b:], run_sum[b:], logits[:, b:], 0)


def _block_pair_weights(logits, lse_rows, lse_cols, r, one_exp_range):
    """W = (P + P^T) / r of a block: exp(logits - lse_i) + exp(logits - lse_j), over r.
    The block's rows are its first columns (lse_rows = lse_cols[:B]). One exponential
    per logit, exp(logits - c) (a_i + a_j) with a = exp(c - lse) / r and c the largest
    lse, where the block's lse lie within one_exp_range of each other; else two."""
    c, low = lse_cols.max(), lse_cols.min()
    if bool(c - low <= one_exp_range):
        a_r, a_c = torch.exp(c - lse_rows).div_(r), torch.exp(c - lse_cols).div_(r)
        return torch.sub(logits, c).exp_().mul_(a_r[:, None] + a_c[None, :])
    w = torch.sub(logits, lse_rows[:, None]).exp_()
    return w.add_(torch.sub(logits, lse_cols[None, :]).exp_()).div_(r)


def _cpu_symmetric(z, scale, exclude_diagonal, need_dz, need_ds):
    """NT-Xent on one process: lse of the rows of s Z Z^T (the diagonal left out if
    exclude_diagonal), and, when asked, the gradients of mean_i lse_i: dz (the rows'
    whole gradient) and ds. Only the blocks on and right of the diagonal are computed
    (Z Z^T is symmetric): one pass for the log-sum-exps (each block updates its rows'
    running max/sum and, right of the diagonal block, its columns'), one for the
    gradient (W = (P + P^T) / R per block: dz_I += s W z_J, dz_J += s W^T z_I). Four
    R x R x D matmul-halves in all where the one-direction path computes six, and
    (in the common case, see _ONE_EXP_RANGE) one exponential per logit per pass."""
    ct = _compute_dtype(z)
    zf, s = z.to(ct), scale.to(ct)
    r = z.shape[0]
    one_exp_range = _ONE_EXP_RANGE[ct]
    run_max = torch.full((r,), float("-inf"), dtype=ct)
    run_sum = torch.zeros(r, dtype=ct)

    def block_logits(r0, r1):
        logits = torch.mm(zf[r0:r1], zf[r0:].t()).mul_(s)
        if exclude_diagonal:
            logits[:, : r1 - r0].fill_diagonal_(float("-inf"))
        return logits

    blocks = list(_triangle_blocks(r))
    floor = math.exp(-one_exp_range)
    for r0, r1 in blocks:  # the columns right of the diagonal block are rows r1..
        _block_lse_update(run_max[r0:], run_sum[r0:], block_logits(r0, r1), r1 - r0, floor)
    shift = torch.where(torch.isfinite(run_max), run_max, torch.zeros_like(run_max))
    lse = run_sum.log_().add_(shift)
    if not (need_dz or need_ds):
        return lse, None, None
    dz = torch.zeros_like(zf) if need_dz else None
    ds = torch.zeros((), dtype=ct)
    for r0, r1 in blocks:
        b = r1 - r0
        logits = block_logits(r0, r1)
        w = _block_pair_weights(logits, lse[r0:r1], lse[r0:], r, one_exp_range)
        if need_dz:
            dz[r0:r1].addmm_(w, zf[r0:])
            if r1 < r:
                dz[r1:].addmm_(w[:, b:].t(), zf[r0:r1])
        if need_ds:  # sum W * logits / s; the diagonal block holds each pair twice
            if exclude_diagonal:
                logits[:, :b].fill_diagonal_(0.0)
            logits.mul_(w)
            ds += (logits[:, :b].sum() / 2 + logits[:, b:].sum()) / s
    if need_dz:
        dz.mul_(s)
    return lse, dz, ds


def _cpu_backward(q, k, scale, lse, grad_lse, exclude_offset, need_dq, need_dk):
    ct = _compute_dtype(q)
    qf, kf, s = q.to(ct), k.to(ct), scale.to(ct)
    lse, grad_lse = lse.to(ct), grad_lse.to(ct)
    r, c = q.shape[0], k.shape[0]
    dq = torch.empty(r, q.shape[1], dtype=ct) if need_dq else None
    dk = torch.zeros(c, k.shape[1], dtype=ct) if need_dk else None
    dscale = torch.zeros((), dtype=ct)
    for r0, r1 in _row_blocks(r, c):
        dots = torch.mm(qf[r0:r1], kf.t())
        # P_ij = exp(scale * dots_ij - lse_i); G = g_i * P_ij
        g = torch.mul(dots, s).sub_(lse[r0:r1, None]).exp_()
        if exclude_offset is not None:
            g[_exclusion(r0, r1, c, exclude_offset, q.device)] = 0.0
        g.mul_(grad_lse[r0:r1, None])
        if need_dq:
            torch.mm(g, kf, out=dq[r0:r1]).mul_(s)
        if need_dk:
            dk.addmm_(g.t(), qf[r0:r1], alpha=1.0)
        dscale += dots.mul_(g).sum()
    if need_dk:
        dk.mul_(s)
    return dq, dk, dscale


def _cpu_pair(x, y, scale, need_dx, need_dy, need_ds):
    """CLIP's two directions over one logit matrix, in row blocks: one pass for
    both log-sum-exps (the rows' final per block, the columns' kept online),
    then, when a gradient is needed, one pass for the gradients of
    mean_i lse_x_i + mean_j lse_y_j: W = P_row / Nx + P_col / Ny,
    dx = s W y, dy = s W^T x, ds = sum W * x.y. Four matmuls per block pair in
    all (the dense loss needs three, and N x N memory)."""
    ct = _compute_dtype(x)
    xf, yf, s = x.to(ct), y.to(ct), scale.to(ct)
    nx, ny = x.shape[0], y.shape[0]
    lse_x = torch.empty(nx, dtype=ct)
    col_m = torch.full((ny,), float("-inf"), dtype=ct)
    col_l = torch.zeros(ny, dtype=ct)
    blocks = _row_blocks(nx, ny)
    for r0, r1 in blocks:
        logits = torch.mm(xf[r0:r1], yf.t()).mul_(s)
        m = logits.amax(dim=1)
        lse_x[r0:r1] = torch.sub(logits, m[:, None]).exp_().sum(dim=1).log_().add_(m)
        _online_update(col_m, col_l, logits, 0)
    lse_y = col_l.log_().add_(col_m)
    if not (need_dx or need_dy or need_ds):
        return lse_x, lse_y, None, None, None
    dx = torch.empty(nx, x.shape[1], dtype=ct) if need_dx else None
    dy = torch.zeros(ny, y.shape[1], dtype=ct) if need_dy else None
    ds = torch.zeros((), dtype=ct)
    for r0, r1 in blocks:
        logits = torch.mm(xf[r0:r1], yf.t()).mul_(s)
        w = torch.sub(logits, lse_x[r0:r1, None]).exp_().div_(nx)
        w.add_(torch.sub(logits, lse_y[None, :]).exp_().div_(ny))
        if need_dx:
            torch.mm(w, yf, out=dx[r0:r1]).mul_(s)
        if need_dy:
            dy.addmm_(w.t(), xf[r0:r1])
        if need_ds:
            ds += logits.mul_(w).sum() / s
    if need_dy:
        dy.mul_(s)
    return lse_x, lse_y, dx, dy, ds if need_ds else None


# ---- custom ops --------------------------------------------------------------------


@torch.library.custom_op("sslfast::dot_lse_mean", mutates_args=())
@without_autocast
def dot_lse_mean(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    exclude_offset: Optional[int],
    extra: Optional[torch.Tensor],
    backend: str,
    need_dq: bool,
    need_dk: bool,
    need_ds: bool,
    symmetric: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean_i lse_i, lse, dq1, dk1, ds1): the loss term, the per-row log-sum-exp
    (float64 for float64 inputs, else float32), and, when ``_eager`` says so, the
    gradients of the mean computed in the forward for the needs flagged (0-element
    tensors otherwise; the backward then recomputes tile by tile). ``symmetric``:
    q and k are the same rows and the exclusion is None or 0 (NT-Xent on one
    process): the Triton backward then makes one pass for the whole gradient."""
    ct = _compute_dtype(q)
    dq = dk = ds = None
    if _symmetric_cpu(backend, symmetric, extra):  # dq: the rows' whole gradient
        lse, dq, ds = _cpu_symmetric(q, scale, exclude_offset == 0, need_dq or need_dk, need_ds)
    elif backend == "cpu":
        lse, dq, dk, ds = _cpu_forward(q, k, scale, exclude_offset, extra, need_dq, need_dk,
                                       need_ds)
    else:
        if backend == "triton" and symmetric and extra is None:
            # each tile pair of the symmetric Z Z^T once
            lse, _ = _pair_kernels().dot_lse_pair_forward(
                q, None, scale, exclude_diagonal=exclude_offset == 0)
        elif backend == "triton":
            lse = _kernels().dot_lse_forward(q, k, scale, exclude_offset, extra)
        else:
            lse = dot_lse_reference(q.double(), k.double(), scale.double(), exclude_offset,
                                    None if extra is None else extra.double()).to(ct)
        if _eager(backend, extra, need_dk) and (need_dq or need_ds):
            grad_lse = torch.full_like(lse, 1.0 / lse.shape[0])
            dq, _, ds = dot_lse_backward(q, k, scale, lse, grad_lse, exclude_offset, need_dq,
                                         False, backend)
            dq = dq if need_dq else None
    none = lambda: q.new_empty(0, dtype=ct)  # noqa: E731
    return (
        lse.mean(),
        lse,
        dq if dq is not None else none(),
        dk if dk is not None else none(),
        ds if need_ds and ds is not None else none(),
    )


def _symmetric_cpu(backend, symmetric, extra):
    """NT-Xent on one process on the CPU: the blocks of half the symmetric matrix, and the
    rows' whole gradient returned as dq (dk empty)."""
    return backend == "cpu" and symmetric and extra is None


def _eager(backend, extra, need_dk):
    """Whether the forward computes the gradients: always on the CPU backend
    (its blocks are final once done); elsewhere against a queue (an ``extra``
    positive and columns that need no gradient), so that the queue is not saved
    for the backward and may be overwritten by ``enqueue_`` before it runs. The
    work is the same either way: one forward and one dq pass."""
    return backend == "cpu" or (extra is not None and not need_dk)


@dot_lse_mean.register_fake
def _(q, k, scale, exclude_offset, extra, backend, need_dq, need_dk, need_ds, symmetric):
    ct = _compute_dtype(q)
    eager = _eager(backend, extra, need_dk)
    if _symmetric_cpu(backend, symmetric, extra):
        need_dq, need_dk = need_dq or need_dk, False
    return (
        q.new_empty((), dtype=ct),
        q.new_empty(q.shape[0], dtype=ct),
        q.new_empty(q.shape if eager and need_dq else (0,), dtype=ct),
        k.new_empty(k.shape if eager and need_dk else (0,), dtype=ct),
        q.new_empty(() if eager and need_ds else (0,), dtype=ct),
    )


@torch.library.custom_op("sslfast::dot_lse_backward", mutates_args=())
@without_autocast
def dot_lse_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    exclude_offset: Optional[int],
    need_dq: bool,
    need_dk: bool,
    backend: str,
    symmetric: bool = False,
    col_lse: Optional[torch.Tensor] = None,
    col_grad: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dscale) in lse's dtype; dq/dk are empty (0-element) when not needed.
    symmetric (q and k the same rows, exclusion None or 0): dq is the rows' whole
    gradient and dk is empty. col_lse/col_grad (CLIP: the lse of k against q and its
    upstream gradient): dq and dscale include that direction too, dk is empty."""
    grad_lse = grad_lse.to(_compute_dtype(q)).contiguous()
    if col_lse is not None:
        col_grad = col_grad.to(_compute_dtype(q)).contiguous()
        if backend == "triton":
            dq, _, dscale = _kernels().dot_lse_backward(q, k, scale, lse, grad_lse, None,
                                                        col_lse=col_lse, col_grad=col_grad)
        else:
            dq, _, ds1 = dot_lse_backward(q, k, scale, lse, grad_lse, None, True, False, backend)
            _, dk2, ds2 = dot_lse_backward(k, q, scale, col_lse, col_grad, None, False, True,
                                           backend)
            dq, dscale = dq + dk2, ds1 + ds2
        need_dq, need_dk = True, False
    elif symmetric:
        if backend == "triton":
            dq, _, dscale = _pair_kernels().dot_lse_pair_backward(
                q, None, scale, lse, None, grad_lse, None, exclude_diagonal=exclude_offset == 0)
        else:
            dq, dk, dscale = dot_lse_backward(q, k, scale, lse, grad_lse, exclude_offset, True,
                                              True, backend)
            dq = dq + dk
        need_dq, need_dk = True, False
    elif backend == "triton":
        dq, dk, dscale = _kernels().dot_lse_backward(q, k, scale, lse, grad_lse, exclude_offset,
                                                     need_dq, need_dk)
    elif backend == "cpu":
        dq, dk, dscale = _cpu_backward(q, k, scale, lse, grad_lse, exclude_offset, need_dq, need_dk)
    else:
        dq, dk, dscale = _reference_backward(q, k, scale, lse, grad_lse, exclude_offset)
    ct = _compute_dtype(q)
    return (
        dq.to(ct) if need_dq else q.new_empty(0, dtype=ct),
        dk.to(ct) if need_dk else q.new_empty(0, dtype=ct),
        dscale.to(ct),
    )


def _reference_backward(q, k, scale, lse, grad_lse, exclude_offset):
    """Dense float64: G = g_i exp(logits_ij - lse_i); dq = s G k, dk = s G^T q.
    (lse is the forward's, which includes any extra logit.)"""
    q64, k64, s64, lse = q.double(), k.double(), scale.double(), lse.double()
    dots = q64 @ k64.t()
    p = torch.exp(s64 * dots - lse[:, None])
    if exclude_offset is not None:
        p[_exclusion(0, q.shape[0], k.shape[0], exclude_offset, q.device)] = 0.0
    g = p * grad_lse.double()[:, None]
    return s64 * g @ k64, s64 * g.t() @ q64, (g * dots).sum()


@dot_lse_backward.register_fake
def _(q, k, scale, lse, grad_lse, exclude_offset, need_dq, need_dk, backend, symmetric=False,
      col_lse=None, col_grad=None):
    ct = _compute_dtype(q)
    if symmetric or col_lse is not None:
        need_dq, need_dk = True, False
    dq = q.new_empty(q.shape, dtype=ct) if need_dq else q.new_empty(0, dtype=ct)
    dk = k.new_empty(k.shape, dtype=ct) if need_dk else k.new_empty(0, dtype=ct)
    return dq, dk, q.new_empty((), dtype=ct)


def _setup_context(ctx, inputs, output):
    q, k, scale, exclude_offset, extra, backend, need_dq, need_dk, need_ds, symmetric = inputs
    _, lse, dq1, dk1, ds1 = output
    want_dq, want_dk, want_ds = ctx.needs_input_grad[:3]
    # The symmetric CPU path's dq1 is the whole gradient of the one tensor q = k.
    ctx.whole_in_dq = _symmetric_cpu(backend, symmetric, extra)
    ctx.eager = (
        _eager(backend, extra, need_dk)
        and (not want_dq or dq1.shape == q.shape)
        and (not want_dk or dk1.shape == k.shape or ctx.whole_in_dq)
        and (not want_ds or ds1.dim() == 0)
    )
    # Eager: q and k are not needed again (k may be a queue about to be overwritten).
    saved = (None, None) if ctx.eager else (q, k)
    ctx.save_for_backward(*saved, scale, extra, lse, dq1, dk1, ds1)
    ctx.dtypes = (q.dtype, k.dtype)
    ctx.exclude_offset, ctx.backend, ctx.symmetric = exclude_offset, backend, symmetric
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_mean, _grad_lse, _g1, _g2, _g3):
    q, k, scale, extra, lse, dq1, dk1, ds1 = ctx.saved_tensors
    need_dq, need_dk, need_scale, _, need_extra = ctx.needs_input_grad[:5]
    none = (None,) * 10
    if grad_mean is None:
        return none
    grad_mean = grad_mean.to(lse.dtype)
    if ctx.eager:  # computed in the forward for every gradient asked (see _setup_context)
        need_dk = need_dk and not ctx.whole_in_dq
        dq = grad_mean * dq1 if need_dq else None
        dk = grad_mean * dk1 if need_dk else None
        dscale = grad_mean * ds1 if need_scale else None
    elif ctx.symmetric and need_dq and need_dk:
        # q and k are one tensor: its whole gradient goes to q (autograd adds the two).
        grad_lse = (grad_mean / lse.shape[0]).expand(lse.shape[0])
        dq, _, dscale = dot_lse_backward(q, k, scale, lse, grad_lse, ctx.exclude_offset,
                                         True, False, ctx.backend, True)
        need_dk = False
    else:
        grad_lse = (grad_mean / lse.shape[0]).expand(lse.shape[0])
        dq, dk, dscale = dot_lse_backward(q, k, scale, lse, grad_lse, ctx.exclude_offset,
                                          need_dq, need_dk, ctx.backend)
    dextra = None
    if need_extra:
        # d mean(lse) / d extra_i = exp(extra_i - lse_i) / R
        dextra = grad_mean / lse.shape[0] * torch.exp(extra - lse)
    q_dtype, k_dtype = ctx.dtypes
    return (
        dq.to(q_dtype) if need_dq else None,
        dk.to(k_dtype) if need_dk else None,
        dscale.to(scale.dtype) if need_scale else None,
        None,
        dextra,
        None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("sslfast::dot_lse_mean", _backward, setup_context=_setup_context)


def dot_lse(q, k, scale, exclude_offset=None, extra=None, backend="cpu"):
    """mean_i lse_i (a 0-dim tensor), differentiable in q, k, scale (0-dim
    tensor) and extra; see the module docstring for lse.

    Inputs are assumed checked by the caller (the losses): q (R, D) and k (C, D)
    of one float dtype on one device; extra (R,) or None.
    """
    symmetric = q is k and exclude_offset in (None, 0)
    q = q.contiguous()
    k = q if symmetric else k.contiguous()
    if extra is not None:
        extra = extra.to(_compute_dtype(q)).contiguous()
    if backend == "triton" and q.dtype == torch.float64:
        raise TypeError("the triton backend takes float32/bfloat16/float16 features; "
                        "use backend='cpu' or 'reference' for float64")
    grad = torch.is_grad_enabled()
    return dot_lse_mean(q, k, scale, exclude_offset, extra, backend,
                        grad and q.requires_grad, grad and k.requires_grad,
                        grad and scale.requires_grad, symmetric)[0]


# ---- CLIP: both directions over the same logits ----------------------------------------


@torch.library.custom_op("sslfast::dot_lse_pair_mean", mutates_args=())
@without_autocast
def dot_lse_pair_mean(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    backend: str,
    need_dx: bool,
    need_dy: bool,
    need_ds: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mean_i lse(x_i against y) + mean_j lse(y_j against x), both over the logits
    scale * x y^T, with (lse_x, lse_y) and, on the ``cpu`` backend, the eager
    gradients (dx1, dy1, ds1) of that sum (0-element otherwise)."""
    ct = _compute_dtype(x)
    none = lambda: x.new_empty(0, dtype=ct)  # noqa: E731
    if backend == "cpu":
        lse_x, lse_y, dx, dy, ds = _cpu_pair(x, y, scale, need_dx, need_dy, need_ds)
        dx = dx if dx is not None else none()
        dy = dy if dy is not None else none()
        ds = ds if ds is not None else none()
    else:
        if backend == "triton":  # both directions in one pass over the tiles
            lse_x, lse_y = _pair_kernels().dot_lse_pair_forward(x, y, scale)
        else:
            x64, y64, s64 = x.double(), y.double(), scale.double()
            lse_x = dot_lse_reference(x64, y64, s64).to(ct)
            lse_y = dot_lse_reference(y64, x64, s64).to(ct)
        dx, dy, ds = none(), none(), none()
    return lse_x.mean() + lse_y.mean(), lse_x, lse_y, dx, dy, ds


@dot_lse_pair_mean.register_fake
def _(x, y, scale, backend, need_dx, need_dy, need_ds):
    ct = _compute_dtype(x)
    eager = backend == "cpu"
    return (
        x.new_empty((), dtype=ct),
        x.new_empty(x.shape[0], dtype=ct),
        y.new_empty(y.shape[0], dtype=ct),
        x.new_empty(x.shape if eager and need_dx else (0,), dtype=ct),
        y.new_empty(y.shape if eager and need_dy else (0,), dtype=ct),
        x.new_empty(() if eager and need_ds else (0,), dtype=ct),
    )


@torch.library.custom_op("sslfast::dot_lse_pair_backward", mutates_args=())
@without_autocast
def dot_lse_pair_backward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    lse_x: torch.Tensor,
    lse_y: torch.Tensor,
    grad_x: torch.Tensor,
    grad_y: torch.Tensor,
    backend: str,
    need_dy: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dy, dscale) of sum(grad_x * lse_x) + sum(grad_y * lse_y) over the logits
    scale * x y^T; dy is empty (0-element) unless need_dy. Triton: one pass over the
    tiles for both sides; otherwise one two-sided pass per side."""
    ct = _compute_dtype(x)
    grad_x = grad_x.to(ct).contiguous()
    grad_y = grad_y.to(ct).contiguous()
    if backend == "triton":
        dx, dy, dscale = _pair_kernels().dot_lse_pair_backward(x, y, scale, lse_x, lse_y,
                                                               grad_x, grad_y, need_dy=need_dy)
    else:
        dx, _, dscale = dot_lse_backward(x, y, scale, lse_x, grad_x, None, True, False, backend,
                                         False, lse_y, grad_y)
        dy = None
        if need_dy:
            dy, _, _ = dot_lse_backward(y, x, scale, lse_y, grad_y, None, True, False, backend,
                                        False, lse_x, grad_x)
    return (dx.to(ct), dy.to(ct) if need_dy else x.new_empty(0, dtype=ct), dscale.to(ct))


@dot_lse_pair_backward.register_fake
def _(x, y, scale, lse_x, lse_y, grad_x, grad_y, backend, need_dy):
    ct = _compute_dtype(x)
    return (x.new_empty(x.shape, dtype=ct), y.new_empty(y.shape if need_dy else (0,), dtype=ct),
            x.new_empty((), dtype=ct))


def _pair_setup_context(ctx, inputs, output):
    x, y, scale, backend, _, _, _ = inputs
    _, lse_x, lse_y, dx1, dy1, ds1 = output
    ctx.save_for_backward(x, y, scale, lse_x, lse_y, dx1, dy1, ds1)
    ctx.backend = backend
    ctx.set_materialize_grads(False)


def _pair_backward(ctx, grad, *_unused):
    x, y, scale, lse_x, lse_y, dx1, dy1, ds1 = ctx.saved_tensors
    need_dx, need_dy, need_scale = ctx.needs_input_grad[:3]
    if grad is None:
        return (None,) * 7
    grad = grad.to(lse_x.dtype)
    eager = (
        ctx.backend == "cpu"
        and (not need_dx or dx1.shape == x.shape)
        and (not need_dy or dy1.shape == y.shape)
        and (not need_scale or ds1.dim() == 0)
    )
    dx = dy = dscale = None
    if eager:
        dx = grad * dx1 if need_dx else None
        dy = grad * dy1 if need_dy else None
        dscale = grad * ds1 if need_scale else None
    else:
        g_x = (grad / lse_x.shape[0]).expand(lse_x.shape[0])
        g_y = (grad / lse_y.shape[0]).expand(lse_y.shape[0])
        dx, dy, dscale = dot_lse_pair_backward(x, y, scale, lse_x, lse_y, g_x, g_y, ctx.backend,
                                               need_dy)
    return (
        dx.to(x.dtype) if need_dx else None,
        dy.to(y.dtype) if need_dy else None,
        dscale.to(scale.dtype) if need_scale else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("sslfast::dot_lse_pair_mean", _pair_backward,
                                setup_context=_pair_setup_context)


def dot_lse_pair(x, y, scale, backend="cpu"):
    """mean_i lse(x_i vs y) + mean_j lse(y_j vs x) over scale * x y^T (CLIP's two
    directions), a 0-dim tensor differentiable in x, y and scale."""
    x, y = x.contiguous(), y.contiguous()
    if backend == "triton" and x.dtype == torch.float64:
        raise TypeError("the triton backend takes float32/bfloat16/float16 features; "
                        "use backend='cpu' or 'reference' for float64")
    grad = torch.is_grad_enabled()
    return dot_lse_pair_mean(x, y, scale, backend, grad and x.requires_grad,
                             grad and y.requires_grad, grad and scale.requires_grad)[0]
