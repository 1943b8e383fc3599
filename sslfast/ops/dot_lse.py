"""The core of the contrastive losses: a row log-sum-exp of scaled dot products,
without ever holding the R x C matrix.

    lse_i = logsumexp( { scale * q_i . k_j : j != i + exclude_offset } U { extra_i } )

Backends: ``triton`` (``sslfast/kernels/dot_lse.py``; CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``), ``cpu`` (blocks of rows against all
columns with the CPU's matmul, recomputed in the backward; each block holds at
most ``_CPU_BLOCK_ELEMS`` logits), ``reference`` (dense).

Registered as the custom ops ``sslfast::dot_lse_forward`` /
``sslfast::dot_lse_backward`` with fake implementations and autograd, so the
losses built on them trace under ``torch.compile``.
"""

from typing import Optional, Tuple

import torch

from sslfast.reference.dot_lse import dot_lse_reference

_CPU_BLOCK_ELEMS = 1 << 22  # 16 MiB of float32 logits per block
IMPLEMENTED = ("triton", "cpu", "reference")


def _kernels():
    from sslfast.kernels import dot_lse as kernels  # imports triton: only when used

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


def _cpu_forward(q, k, scale, exclude_offset, extra):
    ct = _compute_dtype(q)
    qf, kf, s = q.to(ct), k.to(ct), scale.to(ct)
    r, c = q.shape[0], k.shape[0]
    lse = torch.empty(r, dtype=ct, device=q.device)
    for r0, r1 in _row_blocks(r, c):
        logits = torch.mm(qf[r0:r1], kf.t()).mul_(s)
        if exclude_offset is not None:
            logits[_exclusion(r0, r1, c, exclude_offset, q.device)] = float("-inf")
        m = logits.amax(dim=1)
        if extra is not None:
            m = torch.maximum(m, extra[r0:r1].to(ct))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        total = logits.sub_(m[:, None]).exp_().sum(dim=1)
        if extra is not None:
            total += (extra[r0:r1].to(ct) - m).exp()
        lse[r0:r1] = total.log_().add_(m)
    return lse


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


# ---- custom ops --------------------------------------------------------------------


@torch.library.custom_op("sslfast::dot_lse_forward", mutates_args=())
def dot_lse_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    exclude_offset: Optional[int],
    extra: Optional[torch.Tensor],
    backend: str,
) -> torch.Tensor:
    """(R,) log-sum-exp per row (see the module docstring); float64 for float64
    inputs, float32 otherwise."""
    if backend == "triton":
        return _kernels().dot_lse_forward(q, k, scale, exclude_offset, extra)
    if backend == "cpu":
        return _cpu_forward(q, k, scale, exclude_offset, extra)
    return dot_lse_reference(q.double(), k.double(), scale.double(), exclude_offset,
                             None if extra is None else extra.double()).to(_compute_dtype(q))


@dot_lse_forward.register_fake
def _(q, k, scale, exclude_offset, extra, backend):
    return q.new_empty(q.shape[0], dtype=_compute_dtype(q))


@torch.library.custom_op("sslfast::dot_lse_backward", mutates_args=())
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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dscale) in lse's dtype; dq/dk are empty (0-element) when not needed."""
    grad_lse = grad_lse.to(_compute_dtype(q)).contiguous()
    if backend == "triton":
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
def _(q, k, scale, lse, grad_lse, exclude_offset, need_dq, need_dk, backend):
    ct = _compute_dtype(q)
    dq = q.new_empty(q.shape, dtype=ct) if need_dq else q.new_empty(0, dtype=ct)
    dk = k.new_empty(k.shape, dtype=ct) if need_dk else k.new_empty(0, dtype=ct)
    return dq, dk, q.new_empty((), dtype=ct)


def _setup_context(ctx, inputs, output):
    q, k, scale, exclude_offset, extra, backend = inputs
    ctx.save_for_backward(q, k, scale, extra, output)
    ctx.exclude_offset, ctx.backend = exclude_offset, backend


def _backward(ctx, grad_lse):
    q, k, scale, extra, lse = ctx.saved_tensors
    need_dq, need_dk, need_scale, _, need_extra, _ = ctx.needs_input_grad
    dq, dk, dscale = dot_lse_backward(q, k, scale, lse, grad_lse, ctx.exclude_offset,
                                      need_dq, need_dk, ctx.backend)
    dextra = None
    if need_extra:
        # d lse_i / d extra_i = exp(extra_i - lse_i)
        dextra = grad_lse * torch.exp(extra - lse)
    return (
        dq.to(q.dtype) if need_dq else None,
        dk.to(k.dtype) if need_dk else None,
        dscale.to(scale.dtype) if need_scale else None,
        None,
        dextra,
        None,
    )


torch.library.register_autograd("sslfast::dot_lse_forward", _backward, setup_context=_setup_context)


def dot_lse(q, k, scale, exclude_offset=None, extra=None, backend="cpu"):
    """lse (R,) float32, differentiable in q, k, scale (0-dim tensor) and extra.

    Inputs are assumed checked by the caller (the losses): q (R, D) and k (C, D)
    of one float dtype on one device; extra (R,) float32 or None.
    """
    q = q.contiguous()
    k = k.contiguous()
    if extra is not None:
        extra = extra.to(_compute_dtype(q)).contiguous()
    if backend == "triton" and q.dtype == torch.float64:
        raise TypeError("the triton backend takes float32/bfloat16/float16 features; "
                        "use backend='cpu' or 'reference' for float64")
    return dot_lse_forward(q, k, scale, exclude_offset, extra, backend)
