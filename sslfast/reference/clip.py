"""CLIP loss — SEMANTICS.md §3, open_clip.ClipLoss semantics."""

import torch
import torch.nn.functional as F


def clip_reference(image_features, text_features, logit_scale, labels=None):
    """(CE(s x y^T, labels) + CE(s y x^T, labels)) / 2 on normalized features."""
    x = F.normalize(image_features, dim=1, eps=1e-12)
    y = F.normalize(text_features, dim=1, eps=1e-12)
    logits = logit_scale * x @ y.t()
    if labels is None:
        labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
