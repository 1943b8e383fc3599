"""InfoNCE — SEMANTICS.md §2 (MoCo v1/v2, with a queue) and §3 (MoCo v3,
against keys gathered from all ranks)."""

import torch

from sslfast import distributed
from sslfast.ops._contrastive import (
    backend_for,
    check_features,
    check_same_shape,
    mean_ce,
    normalized,
    row_dot,
    scale_tensor,
)


def info_nce_loss(query, key, queue=None, temperature=0.07, labels=None, normalize=True,
                  gather_distributed=False, backend="auto", feature_dim_first=False):
    """Mean cross-entropy of InfoNCE logits, without building them.

    With ``queue`` (K, D), or (D, K) with ``feature_dim_first=True``: logits_i =
    [q_i.k_i | q_i.queue_j] / t, label 0 (MoCo v1/v2). The queue gets no
    gradient and is used as given (MoCo keeps it normalized). The loss is local;
    ``gather_distributed`` must be False (share the queue instead).

    Without a queue: logits = q k^T / t (key (M, D)), against the keys of all
    ranks when ``gather_distributed``; labels default to arange(N) (+ rank * M
    when gathered) (MoCo v3).
    ``normalize`` normalizes query and key.
    """
    check_features(query, "query")
    check_features(key, "key", query, "query")
    if key.shape[1] != query.shape[1]:
        raise ValueError(f"key has dimension {key.shape[1]} but query has {query.shape[1]}")
    if queue is not None:
        check_same_shape(query, "query", key, "key")
    name = backend_for(backend, query.device, "info_nce_loss")
    scale = scale_tensor(temperature, "temperature", query, invert=True)
    q = normalized(query) if normalize else query
    k = normalized(key) if normalize else key
    n, d = query.shape
    if queue is not None:
        if gather_distributed:
            raise ValueError("gather_distributed must be False with a queue: the loss against a "
                             "queue is local (gather the keys into the queue instead)")
        if labels is not None:
            raise ValueError("labels must be None with a queue (the positive is column 0)")
        if not isinstance(queue, torch.Tensor) or queue.dim() != 2:
            raise ValueError(f"queue must be a 2-D tensor, got {getattr(queue, 'shape', queue)}")
        negatives = queue.t() if feature_dim_first else queue
        if negatives.shape[1] != d:
            raise ValueError(f"queue holds {negatives.shape[1]}-dim rows but query is {d}-dim "
                             f"(feature_dim_first={feature_dim_first})")
        if negatives.shape[0] == 0:
            raise ValueError("queue is empty (0 rows)")
        if negatives.device != query.device:
            raise ValueError(f"queue is on {negatives.device} but query is on {query.device}")
        if not negatives.is_floating_point():
            raise TypeError(f"queue must be floating-point, got {negatives.dtype}")
        negatives = negatives.detach().to(q.dtype)
        pos = row_dot(q, k, scale)
        return mean_ce(q, negatives, scale, pos, name, extra=pos)
    gathered = gather_distributed and distributed.world_size() > 1
    keys = distributed.gather(k) if gathered else k
    if labels is None:
        offset = distributed.rank() * key.shape[0] if gathered else 0
        if offset + n > keys.shape[0]:
            raise ValueError(f"default labels need at least {offset + n} keys, key has "
                             f"{keys.shape[0]}: pass labels")
        labels = torch.arange(n, device=query.device) + offset
    else:
        if not isinstance(labels, torch.Tensor) or labels.shape != (n,):
            raise ValueError(
                f"labels must be a ({n},) tensor, got {getattr(labels, 'shape', labels)}")
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"labels must be int64, got {labels.dtype}")
        labels = labels.to(device=query.device, dtype=torch.int64)
        if labels.device.type == "cpu" and not torch.compiler.is_compiling():
            if bool(((labels < 0) | (labels >= keys.shape[0])).any()):
                raise ValueError(f"labels must lie in [0, {keys.shape[0]})")
    pos = row_dot(q, keys[labels], scale)
    return mean_ce(q, keys, scale, pos, name)
