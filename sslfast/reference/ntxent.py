"""NT-Xent (SimCLR) — SEMANTICS.md §1, lightly.loss.NTXentLoss without a memory bank."""

import torch
import torch.nn.functional as F


def ntxent_reference(out0, out1, temperature=0.5):
    """(1/2N) sum_i [ logsumexp_{j != i} s_ij - s_{i, (i+N) mod 2N} ], s = z_i.z_j / t."""
    n = out0.shape[0]
    z = torch.cat([F.normalize(out0, dim=1, eps=1e-12), F.normalize(out1, dim=1, eps=1e-12)])
    logits = z @ z.t() / temperature
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    pos = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return F.cross_entropy(logits, pos)
