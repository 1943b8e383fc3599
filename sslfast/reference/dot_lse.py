"""The core of every contrastive loss here: a row log-sum-exp of scaled dot products.

    lse_i = logsumexp( { scale * q_i . k_j : j != i + exclude_offset } U { extra_i } )

Materializes the R x C matrix: this is the definition, not the fast path.
"""

import torch


def dot_lse_reference(q, k, scale, exclude_offset=None, extra=None):
    """(R,) log-sum-exp per row, in the promoted dtype of the inputs (use float64)."""
    logits = scale * (q @ k.t())
    if exclude_offset is not None:
        rows = torch.arange(q.shape[0], device=q.device)
        cols = rows + exclude_offset
        ok = (cols >= 0) & (cols < k.shape[0])
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[rows[ok], cols[ok]] = True
        logits = logits.masked_fill(mask, float("-inf"))
    if extra is not None:
        logits = torch.cat([extra.to(logits.dtype)[:, None], logits], dim=1)
    return torch.logsumexp(logits, dim=1)
