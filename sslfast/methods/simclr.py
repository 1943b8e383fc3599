"""SimCLR: NT-Xent between two views' projections (fused, gathered across ranks)."""

import torch

from sslfast.augment.presets import SimCLRAugment
from sslfast.losses import NTXentLoss
from sslfast.methods.base import Method, check_views
from sslfast.methods.heads import Encoder, mlp


class SimCLR(Method):
    """``backbone`` + lightly's SimCLR projection head (hidden 2048, output 128,
    BatchNorm), ``NTXentLoss(temperature)`` with negatives from all ranks when
    ``gather_distributed``, and the SimCLR augmentation (2 views)."""

    def __init__(self, backbone, feature_dim=None, image_size=224, hidden_dim=2048,
                 output_dim=128, batch_norm=True, temperature=0.5, gather_distributed=False,
                 augment_dtype=torch.float32, channels_last=False, **augment_changes):
        super().__init__(backbone, feature_dim, image_size)
        self.encoder = Encoder(backbone, mlp([self.feature_dim, hidden_dim, output_dim],
                                             batch_norm=batch_norm, last_batch_norm=batch_norm))
        self.criterion = NTXentLoss(temperature, gather_distributed=gather_distributed)
        self.augmenter = SimCLRAugment(image_size, dtype=augment_dtype,
                                       channels_last=channels_last, **augment_changes)

    def forward(self, views):
        x0, x1 = check_views(views, 2, "SimCLR")[:2]
        z = self.encoder(torch.cat([x0, x1]))  # one pass: BatchNorm sees both views
        z0, z1 = z.chunk(2)
        return self.criterion(z0, z1)
