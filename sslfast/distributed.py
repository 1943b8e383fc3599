"""torch.distributed helpers: rank, world size, a gather that carries gradient,
and the batch shuffle of MoCo's shuffle-BN.

With one process (or torch.distributed not initialized) every helper is the
identity, so single-GPU and CPU code need no special case.
"""

import os
import sys

import torch
import torch.distributed as dist


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def exit_process(status):
    """Flushes stdout and stderr and ends the process at once, skipping Python's
    finalization. A process that ran a gloo group ends this way: a gloo worker
    thread may still be releasing its last collective's tensors after the caller
    saw it complete, and releasing them takes the GIL; if the interpreter is
    finalizing by then, the thread is unwound through a noexcept frame and the
    process aborts (SIGABRT, "terminate called without an active exception",
    intermittent: it failed a CI run of the gloo tests)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


_GATHERS = {}  # this process's gathers per device type; every rank makes the same ones
_SHAPE_DIMS = 6  # leading sizes compared (with the number of dims and of elements)


def _check_same_shape(x):
    """ValueError on every rank, naming the ranks' shapes, unless all ranks pass x
    of one shape (an all-gather of unequal shapes aborts or returns garbage). One
    tiny all-gather: on every call for CPU tensors; for GPU tensors, whose check
    waits for the device, on a process's first gather of them only. The
    collectives stay paired: every rank counts the same gathers."""
    kind = x.device.type
    earlier = _GATHERS.get(kind, 0)
    _GATHERS[kind] = earlier + 1
    if kind != "cpu" and earlier:
        return
    lead = list(x.shape[:_SHAPE_DIMS])
    desc = [x.dim(), x.numel(), *lead, *[-1] * (_SHAPE_DIMS - len(lead))]
    ranks = _gather_into(torch.tensor(desc, dtype=torch.int64, device=x.device))
    ranks = ranks.view(world_size(), -1).tolist()
    if any(d != ranks[0] for d in ranks):
        text = "; ".join(f"rank {r}: {tuple(d[2 : 2 + min(d[0], _SHAPE_DIMS)])}"
                         f"{' + more dims' if d[0] > _SHAPE_DIMS else ''}"
                         for r, d in enumerate(ranks))
        raise ValueError(f"gather: every rank must pass a tensor of the same shape "
                         f"(the same batch size), got {text}")


def _gather_into(x):
    out = x.new_empty((world_size() * x.shape[0], *x.shape[1:]))
    # all_gather_single (torch >= 2.14) is all_gather_into_tensor renamed.
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x)
    return out


def _all_gather(x):
    """The ranks' x concatenated along dim 0, gathered straight into one tensor."""
    _check_same_shape(x)
    return _gather_into(x.contiguous())


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward gives each rank the sum over ranks of the
    gradient for its own rows (a reduce-scatter: half an all-reduce's traffic).
    A bf16/fp16 gradient is summed in fp32 and rounded once (in its own dtype each
    rank's addend would round again)."""

    @staticmethod
    def forward(ctx, x):
        return _all_gather(x)

    @staticmethod
    def backward(ctx, grad):
        acc = torch.float32 if grad.dtype in (torch.bfloat16, torch.float16) else grad.dtype
        # read, never written; contiguous (NCCL needs it; .to() returns grad itself
        # when the dtype matches, even with a memory_format)
        total = grad.to(acc).contiguous()
        mine = total.new_empty((total.shape[0] // world_size(), *total.shape[1:]))
        # reduce_scatter_single (torch >= 2.14) is reduce_scatter_tensor renamed.
        (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(mine, total)
        return mine.to(grad.dtype)


def gather(x):
    """Rows of x from every rank, concatenated in rank order, with gradient.

    All ranks must pass tensors of the same shape (checked: see _check_same_shape).
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x):
    """Rows of x from every rank, concatenated in rank order, without gradient."""
    if world_size() == 1:
        return x
    return _all_gather(x)


def _check_batch(batch, name):
    if not isinstance(batch, torch.Tensor) or batch.dim() == 0:
        raise ValueError(f"{name} must be a tensor with a batch dimension, got "
                         f"{getattr(batch, 'shape', type(batch).__name__)}")


@torch.no_grad()
def batch_shuffle(batch, distributed=False, generator=None):
    """(shuffled batch, index) for MoCo's shuffle-BN (lightly's ``batch_shuffle``).

    One process: ``batch[perm]`` and ``perm``; ``batch_unshuffle`` inverts it.
    ``distributed=True`` (under torch.distributed, equal batch sizes): the
    batches of all ranks are gathered, permuted by one permutation drawn on
    rank 0 and broadcast, and each rank keeps its share; the index returned is
    the one that restores the gathered order (what ``batch_unshuffle`` takes).
    """
    _check_batch(batch, "batch")
    if distributed and world_size() > 1:
        gathered = gather_no_grad(batch)
        perm = torch.randperm(gathered.shape[0], device=batch.device, generator=generator)
        dist.broadcast(perm, src=0)
        mine = perm.view(world_size(), -1)[rank()]
        return gathered[mine], torch.argsort(perm)
    perm = torch.randperm(batch.shape[0], device=batch.device, generator=generator)
    return batch[perm], perm


@torch.no_grad()
def batch_unshuffle(batch, shuffle, distributed=False):
    """Undoes ``batch_shuffle`` (lightly's ``batch_unshuffle``): the rows back in
    their original order, on their original rank."""
    _check_batch(batch, "batch")
    if not isinstance(shuffle, torch.Tensor) or shuffle.dim() != 1:
        raise ValueError("shuffle must be the 1-D index returned by batch_shuffle")
    if distributed and world_size() > 1:
        if shuffle.shape[0] != batch.shape[0] * world_size():
            raise ValueError(f"shuffle indexes {shuffle.shape[0]} rows but {world_size()} ranks of "
                             f"{batch.shape[0]} rows were expected")
        gathered = gather_no_grad(batch)
        return gathered[shuffle.view(world_size(), -1)[rank()]]
    if shuffle.shape[0] != batch.shape[0]:
        raise ValueError(f"shuffle indexes {shuffle.shape[0]} rows but batch has {batch.shape[0]}")
    return batch[torch.argsort(shuffle)]
