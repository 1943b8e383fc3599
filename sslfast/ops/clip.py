"""CLIP loss — SEMANTICS.md §3, open_clip.ClipLoss semantics."""

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
from sslfast.ops.dot_lse import dot_lse_pair


def clip_loss(image_features, text_features, logit_scale, gather_distributed=False,
              backend="auto"):
    """(CE(s x y^T) + CE(s y x^T)) / 2 on normalized features, labels on the
    diagonal (offset by rank * N against gathered features), without the N x N
    logits. ``logit_scale`` is the (already exponentiated) scale: a float or a
    0-dim tensor, which receives its gradient."""
    check_features(image_features, "image_features")
    check_features(text_features, "text_features", image_features, "image_features")
    check_same_shape(image_features, "image_features", text_features, "text_features")
    device = image_features.device
    name = backend_for(backend, device, "clip_loss")
    scale = scale_tensor(logit_scale, "logit_scale", image_features, invert=False)
    x, y = normalized(image_features), normalized(text_features)
    pos = row_dot(x, y, scale)
    if gather_distributed and distributed.world_size() > 1:
        x_all, y_all = distributed.gather(x), distributed.gather(y)
        return (mean_ce(x, y_all, scale, pos, name) + mean_ce(y, x_all, scale, pos, name)) / 2
    # One process: both directions share the logits s x y^T.
    return dot_lse_pair(x, y, scale, backend=name) / 2 - pos.mean()
