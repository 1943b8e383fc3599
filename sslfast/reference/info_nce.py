"""InfoNCE — SEMANTICS.md §2 (MoCo v1/v2, a queue of negatives) and §3 (MoCo v3,
keys gathered from all ranks)."""

import torch
import torch.nn.functional as F


def info_nce_reference(query, key, queue=None, temperature=0.07, labels=None, normalize=True,
                       feature_dim_first=False):
    """Mean cross-entropy of the logits below.

    With a queue (K, D) (or (D, K) with feature_dim_first): logits_i =
    [q_i.k_i | q_i.queue_j] / t, label 0. The queue is used as given.
    Without: logits = q k^T / t (N x M), labels default arange(N).
    """
    if normalize:
        query = F.normalize(query, dim=1, eps=1e-12)
        key = F.normalize(key, dim=1, eps=1e-12)
    if queue is not None:
        negatives = queue.t() if feature_dim_first else queue
        pos = (query * key).sum(dim=1, keepdim=True)
        logits = torch.cat([pos, query @ negatives.t()], dim=1) / temperature
        target = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
        return F.cross_entropy(logits, target)
    logits = query @ key.t() / temperature
    if labels is None:
        labels = torch.arange(query.shape[0], device=query.device)
    return F.cross_entropy(logits, labels)
