"""DINO: self-distillation of an EMA teacher's centered, sharpened distribution
over ``output_dim`` prototypes into the student, across global and local crops."""

import torch

from sslfast.augment.presets import DINOAugment
from sslfast.losses import DINOLoss
from sslfast.methods.base import Method, check_views
from sslfast.methods.heads import DINOHead, Encoder


class DINO(Method):
    """``backbone`` + lightly's DINO head (hidden 2048, bottleneck 256, output
    65536, weight-normalized last layer); the teacher is an EMA of both
    (momentum from ``momentum`` to 1 on a cosine) and sees the 2 global views,
    the student all ``2 + n_local_views``; ``sslfast.DINOLoss`` (fused) with
    teacher-temperature warmup by epoch (``set_epoch``). The last layer gets no
    update during the first ``freeze_last_layer`` epochs
    (``before_optimizer_step``)."""

    def __init__(self, backbone, feature_dim=None, image_size=224, hidden_dim=2048,
                 bottleneck_dim=256, output_dim=65536, n_local_views=8, local_size=None,
                 momentum=0.996, warmup_teacher_temp=0.04, teacher_temp=0.04,
                 warmup_teacher_temp_epochs=30, student_temp=0.1, freeze_last_layer=1,
                 batch_norm=False, augment_dtype=torch.float32, channels_last=False,
                 **augment_changes):
        super().__init__(backbone, feature_dim, image_size)
        self.encoder = Encoder(backbone, DINOHead(self.feature_dim, hidden_dim, bottleneck_dim,
                                                  output_dim, batch_norm))
        self._init_teacher(self.encoder, momentum)
        self.criterion = DINOLoss(output_dim, warmup_teacher_temp, teacher_temp,
                                  warmup_teacher_temp_epochs, student_temp)
        self.freeze_last_layer = freeze_last_layer
        local_size = local_size or max(8, round(image_size * 96 / 224))
        self.augmenter = DINOAugment(n_local_views, image_size, local_size, dtype=augment_dtype,
                                     channels_last=channels_last, **augment_changes)

    def _student_forward(self, views):
        """The student's outputs in the order of the views, one pass per resolution.
        Where each resolution's views are adjacent (global views, then local ones), a
        list of (views, N, K) groups, which the fused loss reads where they are; else
        a list of (N, K) outputs."""
        by_size = {}
        for i, v in enumerate(views):
            by_size.setdefault(tuple(v.shape[-2:]), []).append(i)
        passes = [(idx, self.encoder(torch.cat([views[i] for i in idx])))
                  for idx in by_size.values()]
        if all(idx == list(range(idx[0], idx[-1] + 1)) for idx, _ in passes):
            return [z.view(len(idx), -1, z.shape[-1]) for idx, z in passes]
        out = [None] * len(views)
        for idx, z in passes:
            for i, zi in zip(idx, z.chunk(len(idx))):
                out[i] = zi
        return out

    def forward(self, views):
        views = check_views(views, 2, "DINO")
        teacher_out = self._teacher_forward(torch.cat(views[:2]))
        student_out = self._student_forward(views)
        # (2, N, K): one view of the teacher's pass, which the fused loss takes as it is
        teacher_out = teacher_out.to(student_out[0].dtype).view(2, -1, teacher_out.shape[-1])
        return self.criterion(teacher_out, student_out, epoch=self.epoch)

    def before_optimizer_step(self):
        if self.epoch < self.freeze_last_layer:
            for p in self.encoder.head.last_layer.parameters():
                p.grad = None
