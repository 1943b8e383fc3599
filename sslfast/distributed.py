"""torch.distributed helpers: rank, world size, and a gather that carries gradient.

With one process (or torch.distributed not initialized) every helper is the
identity, so single-GPU and CPU code need no special case.
"""

import torch
import torch.distributed as dist


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward gives each rank the sum over ranks of the
    gradient for its own rows (all_reduce, then its slice)."""

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.n = rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather(x):
    """Rows of x from every rank, concatenated in rank order, with gradient.

    All ranks must pass tensors of the same shape.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x):
    """Rows of x from every rank, concatenated in rank order, without gradient."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
