"""Projection and prediction heads with lightly's default dimensions."""

import torch.nn.functional as F
from torch import nn


def mlp(dims, batch_norm=True, last_batch_norm=False, last_affine=True, act=nn.ReLU):
    """Linear layers through ``dims``; every hidden layer is followed by
    BatchNorm (when ``batch_norm``) and ``act``, the last by BatchNorm only when
    ``last_batch_norm``. A Linear feeding a BatchNorm has no bias (lightly's)."""
    if len(dims) < 2:
        raise ValueError(f"mlp needs at least an input and an output dimension, got {dims}")
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        bn = (last_batch_norm if last else batch_norm)
        layers.append(nn.Linear(d_in, d_out, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm1d(d_out, affine=last_affine or not last))
        if not last:
            layers.append(act())
    return nn.Sequential(*layers)


class NormalizedLinear(nn.Module):
    """A bias-free linear layer with unit-norm weight rows: DINO's weight-normed
    last layer with its gain fixed at 1 (``norm_last_layer=True``)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(nn.init.trunc_normal_(
            nn.Linear(in_features, out_features).weight.detach().clone(), std=0.02))

    def forward(self, x):
        return F.linear(x, F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    """DINO's head: a 3-layer GELU MLP down to ``bottleneck_dim``, L2
    normalization, then ``NormalizedLinear`` to ``output_dim`` (lightly's
    ``DINOProjectionHead`` defaults)."""

    def __init__(self, input_dim=2048, hidden_dim=2048, bottleneck_dim=256, output_dim=65536,
                 batch_norm=False):
        super().__init__()
        self.mlp = mlp([input_dim, hidden_dim, hidden_dim, bottleneck_dim], batch_norm=batch_norm,
                       act=nn.GELU)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = NormalizedLinear(bottleneck_dim, output_dim)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class Encoder(nn.Module):
    """``head(backbone(x).flatten(1))``: the unit an EMA teacher copies."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        return self.head(self.backbone(x).flatten(1))
