"""What an SSL augmentation pipeline does (SEMANTICS.md §6): ``AugmentConfig``
and the presets' configs (lightly's transform defaults)."""

import math
from dataclasses import dataclass, fields, replace

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def blur_kernel_size(output_size):
    """About 10 % of the output size, odd (23 at 224, 9 at 96)."""
    k = int(0.1 * output_size)
    return k if k % 2 == 1 else k + 1


@dataclass(frozen=True)
class AugmentConfig:
    """One view's pipeline, applied with independent random parameters per sample:
    random resized crop to ``output_size`` (area fraction in ``crop_scale``,
    aspect ratio in ``crop_ratio``), horizontal flip (``flip_p``), color jitter
    (``jitter_p``; strengths brightness, contrast, saturation, hue), grayscale
    (``gray_p``), Gaussian blur (``blur_p``, sigma in ``blur_sigma``, odd
    ``blur_kernel_size``, by default about 10 % of the output size), solarize
    (``solarize_p``), normalize (``mean``, ``std``) into ``dtype`` (channels-last
    memory layout with ``channels_last``).
    """

    output_size: int = 224
    crop_scale: tuple = (0.08, 1.0)
    crop_ratio: tuple = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple = (0.1, 2.0)
    blur_kernel_size: int = 0  # 0: blur_kernel_size(output_size)
    solarize_p: float = 0.0
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    dtype: torch.dtype = torch.float32
    channels_last: bool = False

    def __post_init__(self):
        _check_int(self.output_size, "output_size", 1)
        _check_range_pair(self.crop_scale, "crop_scale", 0.0, 1.0, open_low=True)
        _check_range_pair(self.crop_ratio, "crop_ratio", 0.0, math.inf, open_low=True)
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            _check_prob(getattr(self, name), name)
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            if not _is_real(v) or v < 0:
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        if not _is_real(self.hue) or not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue!r}")
        _check_range_pair(self.blur_sigma, "blur_sigma", 0.0, math.inf, open_low=True)
        k = self.blur_kernel_size
        _check_int(k, "blur_kernel_size", 0)
        if k != 0 and k % 2 == 0:
            raise ValueError(f"blur_kernel_size must be odd (or 0: about 10 % of output_size), "
                             f"got {k}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if len(tuple(v)) != 3 or not all(_is_real(x) for x in v):
                raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {v!r}")
            object.__setattr__(self, name, tuple(float(x) for x in v))
        if any(x <= 0 for x in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.dtype not in _OUT_DTYPES:
            raise TypeError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))

    @property
    def kernel_size(self):
        """The blur kernel size in use: blur_kernel_size, or about 10 % of output_size."""
        return self.blur_kernel_size or blur_kernel_size(self.output_size)

    def replace(self, **changes):
        return replace(self, **changes)

    def as_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _is_real(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_int(v, name, low):
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")


def _check_prob(v, name):
    if not _is_real(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {v!r}")


def _check_range_pair(v, name, low, high, open_low=False):
    try:
        a, b = v
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (min, max) pair, got {v!r}") from None
    if not (_is_real(a) and _is_real(b)) or a > b:
        raise ValueError(f"{name} must be a (min, max) pair with min <= max, got {v!r}")
    if (a <= low if open_low else a < low) or b > high:
        bound = "(" if open_low else "["
        raise ValueError(f"{name} must lie in {bound}{low}, {high}], got {v!r}")


# ---- the presets' views (SEMANTICS.md §6) -------------------------------------------------


def simclr_config(output_size=224, **changes):
    return AugmentConfig(output_size=output_size, crop_scale=(0.08, 1.0), brightness=0.8,
                         contrast=0.8, saturation=0.8, hue=0.2, jitter_p=0.8, gray_p=0.2,
                         blur_p=0.5, solarize_p=0.0).replace(**changes)


def mocov2_config(output_size=224, **changes):
    """MoCo v2 and SimSiam."""
    return AugmentConfig(output_size=output_size, crop_scale=(0.2, 1.0), brightness=0.4,
                         contrast=0.4, saturation=0.4, hue=0.1, jitter_p=0.8, gray_p=0.2,
                         blur_p=0.5, solarize_p=0.0).replace(**changes)


def byol_configs(output_size=224, **changes):
    """(view 1, view 2)."""
    base = AugmentConfig(output_size=output_size, crop_scale=(0.08, 1.0), brightness=0.4,
                         contrast=0.4, saturation=0.2, hue=0.1, jitter_p=0.8, gray_p=0.2)
    return (base.replace(**{"blur_p": 1.0, "solarize_p": 0.0, **changes}),
            base.replace(**{"blur_p": 0.1, "solarize_p": 0.2, **changes}))


def dino_configs(global_size=224, local_size=96, local_crop_scale=(0.05, 0.4), **changes):
    """(global 1, global 2, local). ``changes`` apply to every view except that
    ``crop_scale`` is the global views' (the local one is ``local_crop_scale``)."""
    base = AugmentConfig(output_size=global_size, crop_scale=(0.4, 1.0), brightness=0.4,
                         contrast=0.4, saturation=0.2, hue=0.1, jitter_p=0.8, gray_p=0.2)
    return (base.replace(**{"blur_p": 1.0, "solarize_p": 0.0, **changes}),
            base.replace(**{"blur_p": 0.1, "solarize_p": 0.2, **changes}),
            base.replace(**{"blur_p": 0.5, "solarize_p": 0.0, **changes,
                            "crop_scale": local_crop_scale, "output_size": local_size}))
