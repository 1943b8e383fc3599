"""Queue (memory bank) update — SEMANTICS.md §4.

A ring buffer of K rows and a write pointer: every key row is written at the
pointer, which then advances by one, wrapping at K. A batch larger than K
leaves only its newest K rows.
"""

import torch
import torch.nn.functional as F


def enqueue_reference(queue, ptr, keys, normalize=False):
    """(new queue, new pointer) after writing ``keys`` row by row; nothing
    passed in is modified. ``ptr`` is an int or a one-element tensor in [0, K);
    ``normalize`` writes each row divided by max(its L2 norm, 1e-12), computed
    here in float64 and rounded once into the queue's dtype (the kernels
    accumulate the norm in float32, or float64 for float64 queues).

    Row i of the batch lands in slot (ptr + i) mod K; when a batch has more
    than K rows, a later row overwrites an earlier one, so only the newest K
    are written here.
    """
    out = queue.detach().clone()
    size, n = queue.shape[0], keys.shape[0]
    p = int(ptr)
    first = max(0, n - size)  # rows before this one are overwritten within the batch
    rows = keys.detach()[first:]
    if normalize:
        rows = F.normalize(rows.double(), dim=1, eps=1e-12)
    slots = (p + torch.arange(first, n, device=queue.device)) % size
    out[slots] = rows.to(out.dtype)
    return out, (p + n) % size
