"""BYOL: an online network predicts the EMA target network's projection of the
other view (no negatives)."""

import torch

from sslfast.augment.presets import BYOLAugment
from sslfast.losses import BYOLLoss
from sslfast.methods.base import Method, check_views
from sslfast.methods.heads import Encoder, mlp


class BYOL(Method):
    """``backbone`` + lightly's BYOL projection (hidden 4096, output 256) and
    prediction heads; the target is an EMA of backbone + projection (momentum
    from ``momentum`` to 1 on a cosine); loss ``2 - 2 cos(p, z)``, symmetrized
    (BYOL's form); BYOL's two asymmetric views."""

    def __init__(self, backbone, feature_dim=None, image_size=224, hidden_dim=4096,
                 output_dim=256, momentum=0.996, batch_norm=True, augment_dtype=torch.float32,
                 channels_last=False, **augment_changes):
        super().__init__(backbone, feature_dim, image_size)
        self.encoder = Encoder(backbone, mlp([self.feature_dim, hidden_dim, output_dim],
                                             batch_norm=batch_norm))
        self.predictor = mlp([output_dim, hidden_dim, output_dim], batch_norm=batch_norm)
        self._init_teacher(self.encoder, momentum)
        self.criterion = BYOLLoss()
        self.augmenter = BYOLAugment(image_size, dtype=augment_dtype,
                                     channels_last=channels_last, **augment_changes)

    def forward(self, views):
        x0, x1 = check_views(views, 2, "BYOL")[:2]
        # One view per pass (BatchNorm statistics per view), as BYOL's and lightly's code.
        p0, p1 = self.predictor(self.encoder(x0)), self.predictor(self.encoder(x1))
        z0, z1 = self._teacher_forward(x0), self._teacher_forward(x1)
        return self.criterion(p0, z1.to(p0.dtype)) + self.criterion(p1, z0.to(p1.dtype))
