"""NT-Xent (SimCLR) loss — SEMANTICS.md §1, lightly.loss.NTXentLoss semantics."""

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


def ntxent_loss(out0, out1, temperature=0.5, gather_distributed=False, backend="auto"):
    """NT-Xent over Z = [out0; out1] (2N rows): each row against the other 2N - 1
    (against all 2N*W gathered rows but itself with ``gather_distributed``),
    positive at i +- N. No 2N x 2N matrix is built.

    temperature: a float or a 0-dim tensor (its gradient is returned);
    |temperature| < 1e-8 raises; a negative one is used as is (as lightly does).
    """
    check_features(out0, "out0")
    check_features(out1, "out1", out0, "out0")
    check_same_shape(out0, "out0", out1, "out1")
    name = backend_for(backend, out0.device, "ntxent_loss")
    scale = scale_tensor(temperature, "temperature", out0, invert=True)
    n = out0.shape[0]
    z = torch.cat([normalized(out0), normalized(out1)])
    partner = z.roll(n, dims=0)  # row (i + N) mod 2N
    pos = row_dot(z, partner, scale)
    if gather_distributed and distributed.world_size() > 1:
        columns, offset = distributed.gather(z), distributed.rank() * 2 * n
    else:
        columns, offset = z, 0
    return mean_ce(z, columns, scale, pos, name, exclude_offset=offset)
