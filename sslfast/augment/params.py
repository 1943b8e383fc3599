"""Per-sample random parameters of an augmentation pipeline, drawn on the
device from a ``torch.Generator`` (SEMANTICS.md §6): same generator state →
same parameters. The draws follow torchvision's samplers (RandomResizedCrop's
ten tries and fallback, ColorJitter's factors and random order, GaussianBlur's
sigma), vectorized over the batch.
"""

import math
from dataclasses import dataclass, fields

import torch

from sslfast.augment.config import AugmentConfig

_TRIES = 10


@dataclass
class AugmentParams:
    """One view's parameters, one row per sample (all tensors on one device).

    crop_top, crop_left, crop_height, crop_width: int64 (B,), the crop box in
    the source image; flip, jitter, grayscale, solarize: bool (B,);
    brightness, contrast, saturation: float32 (B,) factors (1 = unchanged),
    hue: float32 (B,) shift in turns (0 = unchanged) — neutral where jitter is
    False; jitter_order: int64 (B, 4), the order in which the four jitter ops
    run (0 brightness, 1 contrast, 2 saturation, 3 hue; torchvision's indices);
    blur_sigma: float32 (B,), 0 where there is no blur.
    """

    crop_top: torch.Tensor
    crop_left: torch.Tensor
    crop_height: torch.Tensor
    crop_width: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    jitter_order: torch.Tensor
    grayscale: torch.Tensor
    blur_sigma: torch.Tensor
    solarize: torch.Tensor

    def __len__(self):
        return self.crop_top.shape[0]

    def to(self, device):
        return AugmentParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def sample(self, i):
        """Sample i's parameters as Python values (for the reference and tests)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)[i]
            out[f.name] = v.tolist() if v.dim() else v.item()
        return out


def _sizes(batch_size, image_sizes, device):
    """(H, W) float64 tensors of shape (B,) from an (H, W) pair, a list of pairs
    or a (B, 2) tensor."""
    if isinstance(image_sizes, torch.Tensor):
        sizes = image_sizes.to(device=device, dtype=torch.float64)
        if sizes.shape != (batch_size, 2):
            raise ValueError(f"image_sizes must have shape ({batch_size}, 2), got "
                             f"{tuple(sizes.shape)}")
    else:
        sizes = list(image_sizes)
        if len(sizes) == 2 and all(isinstance(x, int) for x in sizes):
            sizes = [tuple(sizes)] * batch_size
        if len(sizes) != batch_size:
            raise ValueError(f"image_sizes has {len(sizes)} entries for batch_size {batch_size}")
        for hw in sizes:
            if len(tuple(hw)) != 2:
                raise ValueError(f"image_sizes entries must be (height, width), got {hw!r}")
            if min(hw) < 1:
                raise ValueError("image_sizes must be positive")
        # Built on the host and copied without waiting: no sync per view in a training loop.
        sizes = torch.tensor([[float(h), float(w)] for h, w in sizes], dtype=torch.float64)
        sizes = sizes.reshape(-1, 2).to(device, non_blocking=True)
        return sizes[:, 0], sizes[:, 1]
    if sizes.numel() and bool((sizes < 1).any()):
        raise ValueError("image_sizes must be positive")
    return sizes[:, 0], sizes[:, 1]


def _crop_boxes(heights, widths, config, u_tries, u_offsets):
    """RandomResizedCrop.make_params for every sample: the first of ten tries
    whose box fits, else torchvision's fallback (a central crop clamped to the
    ratio range)."""
    area = (heights * widths)[:, None]
    s0, s1 = config.crop_scale
    r0, r1 = math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])
    target = area * (s0 + (s1 - s0) * u_tries[..., 0])
    ratio = torch.exp(r0 + (r1 - r0) * u_tries[..., 1])
    w = torch.round(torch.sqrt(target * ratio))
    h = torch.round(torch.sqrt(target / ratio))
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # the first try that fits
    found = fits.any(dim=1)
    w = w.gather(1, first)[:, 0]
    h = h.gather(1, first)[:, 0]
    top = torch.floor(u_offsets[:, 0] * (heights - h + 1))
    left = torch.floor(u_offsets[:, 1] * (widths - w + 1))
    # Fallback.
    lo, hi = min(config.crop_ratio), max(config.crop_ratio)
    in_ratio = widths / heights
    fb_w = torch.where(in_ratio > hi, torch.round(heights * hi), widths)
    fb_h = torch.where(in_ratio < lo, torch.round(widths / lo), heights)
    fb_top = torch.div(heights - fb_h, 2, rounding_mode="floor")
    fb_left = torch.div(widths - fb_w, 2, rounding_mode="floor")
    pick = lambda a, b: torch.where(found, a, b).to(torch.int64)  # noqa: E731
    return pick(top, fb_top), pick(left, fb_left), pick(h, fb_h), pick(w, fb_w)


def sample_params(batch_size, image_sizes, config, generator=None, device=None):
    """Independent parameters for ``batch_size`` samples of ``config``'s pipeline.

    Args:
        batch_size: number of samples (>= 0).
        image_sizes: the source images' (height, width): one pair for all, a
            list of pairs, or a (B, 2) tensor.
        config: an ``AugmentConfig``.
        generator: a ``torch.Generator``; the draws happen on its device. None:
            the default generator of ``device``.
        device: where to draw when no generator is given (default CPU).
    Returns:
        ``AugmentParams`` on the generator's (or ``device``'s) device.
    """
    if not isinstance(config, AugmentConfig):
        raise TypeError(f"config must be an AugmentConfig, got {type(config).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        device = generator.device
    device = torch.device(device if device is not None else "cpu")
    heights, widths = _sizes(batch_size, image_sizes, device)
    b = batch_size

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=device)

    # One fixed sequence of draws (float32 uniforms, as torchvision's), so that a
    # generator state gives one result.
    u_tries = rand(b, _TRIES, 2).double()
    u_offsets = rand(b, 2).double()
    u_flip, u_jitter, u_gray, u_blur, u_solarize = rand(5, b)
    u_factors = rand(b, 4)
    u_order = rand(b, 4)
    u_sigma = rand(b)

    top, left, h, w = _crop_boxes(heights, widths, config, u_tries, u_offsets)
    jitter = u_jitter < config.jitter_p

    def factor(v, u):
        lo = max(0.0, 1.0 - v)
        return torch.where(jitter, lo + (1.0 + v - lo) * u, torch.ones_like(u))

    blur = u_blur < config.blur_p
    s0, s1 = config.blur_sigma
    return AugmentParams(
        crop_top=top, crop_left=left, crop_height=h, crop_width=w,
        flip=u_flip < config.flip_p,
        jitter=jitter,
        brightness=factor(config.brightness, u_factors[:, 0]),
        contrast=factor(config.contrast, u_factors[:, 1]),
        saturation=factor(config.saturation, u_factors[:, 2]),
        hue=torch.where(jitter, -config.hue + 2 * config.hue * u_factors[:, 3],
                        torch.zeros_like(u_factors[:, 3])),
        jitter_order=torch.argsort(u_order, dim=1),  # a uniform random permutation
        grayscale=u_gray < config.gray_p,
        blur_sigma=torch.where(blur, s0 + (s1 - s0) * u_sigma, torch.zeros_like(u_sigma)),
        solarize=u_solarize < config.solarize_p,
    )
