"""Per-sample SSL augmentation (SEMANTICS.md §6): pipeline configs, the presets'
views, and per-sample parameters drawn on the device.

Built so far: ``AugmentConfig`` and the presets' configs (SimCLR, MoCo v2 /
SimSiam, BYOL, DINO), ``sample_params`` / ``AugmentParams``; the definition
of the pipeline is ``sslfast.reference.augment_reference``. The fused
augmentation kernels and the preset callables come with the rest of issue 5.
"""

from sslfast.augment.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    blur_kernel_size,
    byol_configs,
    dino_configs,
    mocov2_config,
    simclr_config,
)
from sslfast.augment.params import AugmentParams, sample_params

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentConfig",
    "AugmentParams",
    "blur_kernel_size",
    "byol_configs",
    "dino_configs",
    "mocov2_config",
    "sample_params",
    "simclr_config",
]
