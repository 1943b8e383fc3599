"""SimSiam: BYOL without the EMA target, a stop-gradient instead."""

import torch

from sslfast.augment.presets import MoCoV2Augment
from sslfast.losses import NegativeCosineSimilarity
from sslfast.methods.base import Method, check_views
from sslfast.methods.heads import Encoder, mlp


class SimSiam(Method):
    """``backbone`` + lightly's SimSiam projection (3 layers of 2048, BatchNorm
    after each, the output's without affine) and prediction (hidden 512) heads,
    each view through them on its own (BatchNorm statistics per view, as SimSiam's
    code); loss
    ``(D(p0, z1) + D(p1, z0)) / 2`` with D the negative cosine similarity and
    z detached; MoCo v2's augmentation."""

    def __init__(self, backbone, feature_dim=None, image_size=224, hidden_dim=2048,
                 output_dim=2048, pred_hidden_dim=512, batch_norm=True,
                 augment_dtype=torch.float32, channels_last=False, **augment_changes):
        super().__init__(backbone, feature_dim, image_size)
        self.encoder = Encoder(backbone, mlp([self.feature_dim, hidden_dim, hidden_dim,
                                              output_dim], batch_norm=batch_norm,
                                             last_batch_norm=batch_norm, last_affine=False))
        self.predictor = mlp([output_dim, pred_hidden_dim, output_dim], batch_norm=batch_norm)
        self.criterion = NegativeCosineSimilarity()
        self.augmenter = MoCoV2Augment(image_size, dtype=augment_dtype,
                                       channels_last=channels_last, **augment_changes)

    def forward(self, views):
        x0, x1 = check_views(views, 2, "SimSiam")[:2]
        z0, z1 = self.encoder(x0), self.encoder(x1)  # one view per pass: per-view BN stats
        p0, p1 = self.predictor(z0), self.predictor(z1)
        return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))
