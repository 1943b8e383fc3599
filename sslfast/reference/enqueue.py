"""Queue (memory bank) update — SEMANTICS.md §4.

A ring buffer of K rows and a write pointer: every key row is written at the
pointer, which then advances by one, wrapping at K. A batch larger than K
leaves only its newest K rows.
"""

import torch.nn.functional as F


def enqueue_reference(queue, ptr, keys, normalize=False):
    """(new queue, new pointer) after writing ``keys`` row by row; nothing
    passed in is modified. ``ptr`` is an int or a one-element tensor in [0, K);
    ``normalize`` writes each row divided by max(its L2 norm, 1e-12), computed
    here in float64 and rounded once into the queue's dtype (the kernels
    accumulate the norm in float32, or float64 for float64 queues)."""
    out = queue.detach().clone()
    size = queue.shape[0]
    p = int(ptr)
    for row in keys.detach():
        if normalize:
            row = F.normalize(row.double(), dim=0, eps=1e-12)
        out[p] = row.to(out.dtype)
        p = (p + 1) % size
    return out, p
