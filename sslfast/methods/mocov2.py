"""MoCo v2: a query encoder, its EMA key encoder, and a queue of past keys."""

import torch

from sslfast import distributed
from sslfast.augment.presets import MoCoV2Augment
from sslfast.methods.base import Method, check_views
from sslfast.methods.heads import Encoder, mlp
from sslfast.modules.memory_bank import MemoryBank
from sslfast.ops.info_nce import info_nce_loss


class MoCoV2(Method):
    """``backbone`` + MoCo v2's MLP head (hidden 2048, output 128, no BatchNorm);
    the key encoder is an EMA of it (momentum ``momentum`` rising to 1 on a
    cosine); InfoNCE of the queries against [their key | the queue] at
    ``temperature``; then the keys — of all ranks with ``gather_distributed`` —
    enter the ``queue_size`` queue (fused, no host sync). Under
    torch.distributed the key encoder sees a batch shuffled across ranks
    (shuffle-BN) unless ``shuffle_bn=False``."""

    def __init__(self, backbone, feature_dim=None, image_size=224, hidden_dim=2048,
                 output_dim=128, queue_size=65536, temperature=0.2, momentum=0.996,
                 gather_distributed=False, shuffle_bn=True, augment_dtype=torch.float32,
                 channels_last=False, **augment_changes):
        super().__init__(backbone, feature_dim, image_size)
        self.encoder = Encoder(backbone, mlp([self.feature_dim, hidden_dim, output_dim],
                                             batch_norm=False))
        self._init_teacher(self.encoder, momentum)
        self.queue = MemoryBank(queue_size, output_dim, gather_distributed=gather_distributed)
        self.temperature = temperature
        self.shuffle_bn = shuffle_bn
        self.augmenter = MoCoV2Augment(image_size, dtype=augment_dtype,
                                       channels_last=channels_last, **augment_changes)

    @torch.no_grad()
    def keys(self, x):
        shuffle = self.shuffle_bn and distributed.world_size() > 1
        if shuffle:
            x, idx = distributed.batch_shuffle(x, distributed=True)
        k = self._teacher_forward(x)
        return distributed.batch_unshuffle(k, idx, distributed=True) if shuffle else k

    def forward(self, views):
        x_q, x_k = check_views(views, 2, "MoCoV2")[:2]
        q = self.encoder(x_q)
        k = self.keys(x_k)
        loss = info_nce_loss(q, k.to(q.dtype), queue=self.queue.negatives().to(q.dtype),
                             temperature=self.temperature)
        if self.training:
            self.queue.enqueue(k)  # safe before backward: the queue loss keeps no queue
        return loss
