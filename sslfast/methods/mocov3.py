"""MoCo v3: symmetric InfoNCE of predicted queries against the EMA encoder's keys
of the other view, keys gathered from all ranks (no queue)."""

import torch

from sslfast.augment.presets import MoCoV2Augment
from sslfast.methods.base import Method, check_views
from sslfast.methods.heads import Encoder, mlp
from sslfast.ops.info_nce import info_nce_loss


class MoCoV3(Method):
    """``backbone`` + a 3-layer projection (hidden 4096, output 256, BatchNorm
    everywhere) + a 2-layer predictor (hidden 4096); the momentum encoder is an
    EMA of backbone + projection. Loss: ``2 tau (ctr(q1, k2) + ctr(q2, k1))``
    as in MoCo v3's code, ``ctr`` the InfoNCE of the queries against the keys of
    all ranks (labels offset by rank) with ``gather_distributed``."""

    def __init__(self, backbone, feature_dim=None, image_size=224, hidden_dim=4096,
                 output_dim=256, temperature=0.2, momentum=0.99, gather_distributed=False,
                 augment_dtype=torch.float32, channels_last=False, **augment_changes):
        super().__init__(backbone, feature_dim, image_size)
        self.encoder = Encoder(backbone, mlp([self.feature_dim, hidden_dim, hidden_dim,
                                              output_dim], last_batch_norm=True,
                                             last_affine=False))
        self.predictor = mlp([output_dim, hidden_dim, output_dim], last_batch_norm=True,
                             last_affine=False)
        self._init_teacher(self.encoder, momentum)
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.augmenter = MoCoV2Augment(image_size, dtype=augment_dtype,
                                       channels_last=channels_last, **augment_changes)

    def _ctr(self, q, k):
        loss = info_nce_loss(q, k.to(q.dtype), temperature=self.temperature,
                             gather_distributed=self.gather_distributed)
        return 2 * self.temperature * loss

    def forward(self, views):
        x1, x2 = check_views(views, 2, "MoCoV3")[:2]
        q1, q2 = self.predictor(self.encoder(torch.cat([x1, x2]))).chunk(2)
        k1, k2 = self._teacher_forward(torch.cat([x1, x2])).chunk(2)
        return self._ctr(q1, k2) + self._ctr(q2, k1)
