"""What every method shares: the backbone, its augmentation preset, the EMA
teacher's cosine momentum, and the training-loop contract

    views = method.augment(images); loss = method(views); loss.backward()
    optimizer.step(); method.step_end(step, max_steps)
"""

import torch
from torch import nn

from sslfast.modules.ema import ModelEMA
from sslfast.schedules import cosine_schedule


@torch.no_grad()
def infer_feature_dim(backbone, image_size=224):
    """The width of ``backbone``'s flattened output: ``num_features`` (timm) or
    one forward pass on two blank images."""
    dim = getattr(backbone, "num_features", None)
    if isinstance(dim, int) and dim > 0:
        return dim
    p = next(backbone.parameters(), None)
    was_training = backbone.training
    backbone.eval()
    try:
        x = torch.zeros(2, 3, image_size, image_size,
                        device=p.device if p is not None else None,
                        dtype=p.dtype if p is not None and p.is_floating_point() else None)
        return int(backbone(x).flatten(1).shape[1])
    finally:
        backbone.train(was_training)


class Method(nn.Module):
    """Base class. Subclasses set ``augmenter`` (a preset: images -> views) and
    implement ``forward(views) -> loss``; those with a teacher call
    ``_init_teacher``."""

    def __init__(self, backbone, feature_dim=None, image_size=224):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.backbone = backbone
        self.image_size = image_size
        self.feature_dim = feature_dim or infer_feature_dim(backbone, image_size)
        self.epoch = 0
        self.teacher = None
        self.momentum = None

    def augment(self, images, generator=None):
        """All the method's views of ``images`` (uint8 (B, 3, H, W) or a list of
        (3, Hi, Wi)), each sample with its own random parameters."""
        return self.augmenter(images, generator)

    def set_epoch(self, epoch):
        """For per-epoch schedules (DINO's teacher temperature, last-layer freeze)."""
        self.epoch = int(epoch)

    def embed(self, x):
        """Backbone features (what kNN / linear evaluation use)."""
        return self.backbone(x).flatten(1)

    def _init_teacher(self, student, momentum):
        # Buffers skipped: the teacher runs in train mode like the student (batch
        # statistics, its own running stats), as in MoCo, BYOL and DINO.
        self.base_momentum = momentum
        self.teacher = ModelEMA(student, decay=momentum, buffers="skip")
        self.teacher.module.train(self.training)

    def before_optimizer_step(self):
        """Between ``backward`` and ``optimizer.step()`` (DINO drops its last
        layer's gradients while that layer is frozen)."""

    def step_end(self, step, max_steps):
        """After ``optimizer.step()``: the teacher follows the student with a
        momentum rising on a cosine from ``base_momentum`` to 1."""
        if self.teacher is None:
            return
        self.momentum = cosine_schedule(step, max_steps, self.base_momentum, 1.0)
        self.teacher.update(self.encoder, decay=self.momentum)

    @torch.no_grad()
    def _teacher_forward(self, x):
        return self.teacher.module(x)


def check_views(views, n, where):
    if not isinstance(views, (list, tuple)) or len(views) < n:
        raise ValueError(f"{where}: views must be a list of at least {n} batches (from "
                         f"method.augment), got {type(views).__name__} of length "
                         f"{len(views) if isinstance(views, (list, tuple)) else '-'}")
    for i, v in enumerate(views):
        if not isinstance(v, torch.Tensor) or v.dim() != 4:
            raise ValueError(f"{where}: views[{i}] must be a (B, C, H, W) tensor, got "
                             f"{getattr(v, 'shape', type(v).__name__)}")
    return list(views)
