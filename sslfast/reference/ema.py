"""EMA (momentum) update — SEMANTICS.md §5.

For each pair (target t, source s): t_new = decay * t + (1 - decay) * s.
"""

import torch


def ema_reference(targets, sources, decay, dtype=torch.float64):
    """The updated targets, as new tensors in ``dtype`` (float64 by default).

    Nothing passed in is modified.
    """
    decay = torch.as_tensor(decay, dtype=dtype).cpu()
    out = []
    for t, s in zip(targets, sources):
        t64 = t.detach().to(device="cpu", dtype=dtype)
        s64 = s.detach().to(device="cpu", dtype=dtype)
        out.append(decay * t64 + (1 - decay) * s64)
    return out
