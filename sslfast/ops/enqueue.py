"""Queue (memory bank) update: validation, backend dispatch, custom-op registration.

``enqueue_(queue, ptr, keys)`` writes the rows of ``keys`` (N, D) into the ring
buffer ``queue`` (K, D) starting at slot ``ptr`` (a one-element int64 tensor on
the queue's device), wrapping around the end, and advances ``ptr`` by N modulo
K (SEMANTICS.md §4). With N > K only the newest K rows survive.

Backends: ``cuda`` (one kernel that reads and advances the pointer on the
device, ``csrc/enqueue/enqueue_cuda.cu``), ``cpu`` (``csrc/enqueue/enqueue_cpu.cpp``),
``reference`` (row by row). Without the compiled extension ``cuda``/``cpu`` run a
PyTorch fallback (``index_copy_`` at slots computed on the device), which makes
no host synchronization either.
"""

import torch
import torch.nn.functional as F

from sslfast import _extension
from sslfast._backend import resolve_backend
from sslfast.reference.enqueue import enqueue_reference

_IMPLEMENTED = ("cuda", "cpu", "reference")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _overlaps(a, b):
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1 = a0 + (a.numel() - 1) * a.element_size() if a.is_contiguous() else None
    b1 = b0 + (b.numel() - 1) * b.element_size() if b.is_contiguous() else None
    if a1 is None or b1 is None:
        return True  # same storage, not both dense: assume they overlap
    return a0 <= b1 and b0 <= a1


def check_args(queue, ptr, keys, check_overlap=True):
    """The checks the C++ op makes, for the Python paths and tracing (where
    fake tensors have no memory to compare: ``check_overlap=False``)."""
    for name, x in (("queue", queue), ("ptr", ptr), ("keys", keys)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"enqueue_: {name} must be a torch.Tensor, got {type(x).__name__}")
    if queue.dim() != 2:
        raise ValueError(f"enqueue_: queue must be 2-D (size, dim), got shape {tuple(queue.shape)}")
    if queue.dtype not in _DTYPES:
        raise TypeError(f"enqueue_: queue must be float32, bfloat16, float16 or float64, got "
                        f"{queue.dtype}")
    if queue.shape[0] == 0:
        raise ValueError("enqueue_: queue has size 0 (no rows)")
    if queue.shape[0] > 2**31 - 1:
        raise ValueError(f"enqueue_: queue has {queue.shape[0]} rows, more than 2^31 - 1")
    if not queue.is_contiguous():
        raise ValueError("enqueue_: queue must be contiguous")
    if ptr.dtype != torch.int64:
        raise TypeError(f"enqueue_: ptr must be int64, got {ptr.dtype}")
    if ptr.numel() != 1:
        raise ValueError(f"enqueue_: ptr must have one element, got shape {tuple(ptr.shape)}")
    if ptr.device != queue.device:
        raise ValueError(f"enqueue_: ptr is on {ptr.device} but queue is on {queue.device}")
    if keys.dim() != 2:
        raise ValueError(f"enqueue_: keys must be 2-D (batch, dim), got shape {tuple(keys.shape)}")
    if keys.device != queue.device:
        raise ValueError(f"enqueue_: keys is on {keys.device} but queue is on {queue.device}")
    if keys.dtype != queue.dtype:
        raise TypeError(f"enqueue_: keys is {keys.dtype} but queue is {queue.dtype}")
    if keys.shape[1] != queue.shape[1]:
        raise ValueError(f"enqueue_: keys has dimension {keys.shape[1]} but queue has "
                         f"{queue.shape[1]}")
    if check_overlap and _overlaps(queue, keys):
        raise ValueError("enqueue_: keys shares memory with queue")
    if check_overlap and _overlaps(queue, ptr):
        raise ValueError("enqueue_: ptr shares memory with queue")


def _check_ptr_value(ptr, size):
    """On the CPU the pointer's value is checked (reading it costs nothing);
    on a GPU that would be a host sync, so the op keeps it in range itself."""
    if ptr.device.type == "cpu" and not torch.compiler.is_compiling():
        value = int(ptr.reshape(()))
        if not 0 <= value < size:
            raise ValueError(f"enqueue_: ptr holds {value}, outside [0, {size})")


@torch.no_grad()
def _enqueue_torch_(queue, ptr, keys, normalize):
    """The PyTorch fallback: slots computed on the device, one index_copy_."""
    size, n = queue.shape[0], keys.shape[0]
    kept = keys[max(0, n - size):]
    if normalize:
        work = torch.float64 if queue.dtype == torch.float64 else torch.float32
        kept = F.normalize(kept.to(work), dim=1, eps=1e-12)
    start = ptr.reshape(()).bitwise_and(0xFFFFFFFF).remainder(size)
    slots = torch.arange(n - kept.shape[0], n, device=queue.device).add_(start).remainder_(size)
    queue.index_copy_(0, slots, kept.to(queue.dtype))
    ptr.copy_(start.add(n % size).remainder(size).reshape(ptr.shape))


@torch.no_grad()
def _enqueue_reference_(queue, ptr, keys, normalize):
    new_queue, new_ptr = enqueue_reference(queue, ptr, keys, normalize)
    queue.copy_(new_queue)
    ptr.fill_(new_ptr)


def enqueue_(queue, ptr, keys, normalize=False, *, backend="auto"):
    """Writes ``keys`` into the ring buffer ``queue`` at ``ptr`` and advances ``ptr``.

    Args:
        queue: (K, D) contiguous float32/bfloat16/float16/float64 tensor, updated
            in place.
        ptr: one-element int64 tensor on the queue's device holding the next
            slot, in [0, K); updated in place (on a GPU without a host sync).
            The op always leaves it in range; on the CPU its value is checked,
            on a GPU (where reading it would sync) a value set by hand outside
            [0, K) is undefined behaviour: the CUDA kernel uses the pointer's
            high 32 bits as its blocks' arrival counter. For the same reason,
            two enqueue_ calls on one ptr must not run concurrently (on two
            streams without ordering).
        keys: (N, D) tensor of the queue's dtype and device; any N >= 0 (with
            N > K the newest K rows are kept). Never modified; no gradient flows.
        normalize: write each row divided by max(its L2 norm, 1e-12), computed in
            float32 (float64 for float64) and rounded once.
        backend: "auto", "cuda", "cpu" or "reference".
    """
    check_args(queue, ptr, keys, check_overlap=not torch.compiler.is_compiling())
    name = resolve_backend(backend, queue.device, "enqueue_", _IMPLEMENTED)
    _check_ptr_value(ptr, queue.shape[0])
    keys = keys.detach()
    if keys.shape[0] == 0:
        return
    compiled = _extension.has_cuda_kernels() if name == "cuda" else _extension.has_cpu_kernels()
    if name == "reference":
        _enqueue_reference_(queue, ptr, keys, normalize)
    elif compiled:
        torch.ops.sslfast.enqueue_(queue, ptr, keys, normalize)
    else:
        _extension.warn_fallback("enqueue_", queue.device.type)
        _enqueue_torch_(queue, ptr, keys, normalize)


def _register_fake():
    if _extension.extension() is None:
        return

    @torch.library.register_fake("sslfast::enqueue_")
    def _enqueue_fake(queue, ptr, keys, normalize=False):
        check_args(queue, ptr, keys, check_overlap=False)
        return None


_register_fake()
