"""MoCo v3: symmetric InfoNCE of predicted queries against the EMA encoder's keys
of the other view, keys gathered from all ranks (no queue)."""

import torch

from sslfast.augment.presets import BYOLAugment
from sslfast.methods.base import Method, check_views
from sslfast.methods.heads import Encoder, mlp
from sslfast.ops.info_nce import info_nce_loss


class MoCoV3(Method):
    """``backbone`` + MoCo v3's heads: a projection of ``projection_layers``
    linear layers (hidden 4096, output 256, BatchNorm after each, the last
    without affine) and a 2-layer predictor (hidden 4096; a last BatchNorm only
    with ``predictor_last_bn``). The defaults are MoCo v3's ResNet recipe; for a
    ViT it uses ``projection_layers=3, predictor_last_bn=True``. The momentum
    encoder is an EMA of backbone + projection; each view goes through the
    networks on its own (per-view BatchNorm statistics, as MoCo v3's code). Loss:
    ``2 tau (ctr(q1, k2) + ctr(q2, k1))`` as in MoCo v3's code, ``ctr`` the
    InfoNCE of the queries against the keys of all ranks (labels offset by rank)
    with ``gather_distributed``. Views: BYOL's asymmetric pair, as MoCo v3."""

    def __init__(self, backbone, feature_dim=None, image_size=224, hidden_dim=4096,
                 output_dim=256, temperature=0.2, momentum=0.99, gather_distributed=False,
                 projection_layers=2, predictor_last_bn=False, augment_dtype=torch.float32,
                 channels_last=False, **augment_changes):
        super().__init__(backbone, feature_dim, image_size)
        if isinstance(projection_layers, bool) or not isinstance(projection_layers, int) or \
                projection_layers < 1:
            raise ValueError(f"projection_layers must be an int >= 1, got {projection_layers!r}")
        dims = [self.feature_dim] + [hidden_dim] * (projection_layers - 1) + [output_dim]
        self.encoder = Encoder(backbone, mlp(dims, last_batch_norm=True, last_affine=False))
        self.predictor = mlp([output_dim, hidden_dim, output_dim],
                             last_batch_norm=predictor_last_bn, last_affine=False)
        self._init_teacher(self.encoder, momentum)
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.augmenter = BYOLAugment(image_size, dtype=augment_dtype,
                                     channels_last=channels_last, **augment_changes)

    def _ctr(self, q, k):
        loss = info_nce_loss(q, k.to(q.dtype), temperature=self.temperature,
                             gather_distributed=self.gather_distributed)
        return 2 * self.temperature * loss

    def forward(self, views):
        x1, x2 = check_views(views, 2, "MoCoV3")[:2]
        q1, q2 = self.predictor(self.encoder(x1)), self.predictor(self.encoder(x2))
        k1, k2 = self._teacher_forward(x1), self._teacher_forward(x2)
        return self._ctr(q1, k2) + self._ctr(q2, k1)
