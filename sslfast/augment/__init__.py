"""Per-sample SSL augmentation (SEMANTICS.md §6): pipeline configs, the presets'
views, and per-sample parameters drawn on the device.

``AugmentConfig`` and the presets' configs (SimCLR, MoCo v2 / SimSiam, BYOL,
DINO); ``sample_params`` / ``AugmentParams``; the preset callables
(``SimCLRAugment``, ...) over ``sslfast.functional.augment``. The definition of
the pipeline is ``sslfast.reference.augment_reference``.
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
from sslfast.augment.presets import (
    BYOLAugment,
    DINOAugment,
    MoCoV2Augment,
    SimCLRAugment,
    ViewsAugment,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentConfig",
    "AugmentParams",
    "BYOLAugment",
    "DINOAugment",
    "MoCoV2Augment",
    "SimCLRAugment",
    "ViewsAugment",
    "blur_kernel_size",
    "byol_configs",
    "dino_configs",
    "mocov2_config",
    "sample_params",
    "simclr_config",
]
