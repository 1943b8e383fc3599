"""SSL augmentation — SEMANTICS.md §6: torchvision.transforms.v2.functional
applied to one float32 image in [0, 1] per sample, with that sample's
parameters (``sslfast.augment.AugmentParams``), in the pipeline's order."""

import torch


def _float_image(img):
    if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"each image must be a (3, H, W) tensor, got "
                         f"{getattr(img, 'shape', type(img).__name__)}")
    if img.dtype == torch.uint8:
        return img.float() / 255.0
    if img.is_floating_point():
        return img.float()
    raise TypeError(f"images must be uint8 or floating point, got {img.dtype}")


def augment_one_reference(img, p, config):
    """One (3, H, W) image, p = params.sample(i) (a dict), config an AugmentConfig:
    the (3, S, S) float32 result before the cast to config.dtype."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    x = _float_image(img)
    s = config.output_size
    x = F.resized_crop(x, p["crop_top"], p["crop_left"], p["crop_height"], p["crop_width"],
                       [s, s], interpolation=InterpolationMode.BILINEAR, antialias=True)
    if p["flip"]:
        x = F.horizontal_flip(x)
    if p["jitter"]:
        for op in p["jitter_order"]:
            if op == 0:
                x = F.adjust_brightness(x, p["brightness"])
            elif op == 1:
                x = F.adjust_contrast(x, p["contrast"])
            elif op == 2:
                x = F.adjust_saturation(x, p["saturation"])
            else:
                x = F.adjust_hue(x, p["hue"])
    if p["grayscale"]:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if p["blur_sigma"] > 0:
        k = config.kernel_size
        x = F.gaussian_blur(x, [k, k], [p["blur_sigma"], p["blur_sigma"]])
    if p["solarize"]:
        x = F.solarize(x, 0.5)
    return F.normalize(x, list(config.mean), list(config.std))


def augment_reference(images, params, config):
    """(B, 3, S, S) in config.dtype: augment_one_reference per sample.
    images: a (B, 3, H, W) tensor or a list of (3, Hi, Wi) tensors (uint8 or
    float in [0, 1])."""
    n = len(images)
    if n != len(params):
        raise ValueError(f"{n} images but parameters for {len(params)}")
    out = [augment_one_reference(images[i], params.sample(i), config) for i in range(n)]
    s = config.output_size
    batch = torch.stack(out) if out else torch.empty(0, 3, s, s)
    batch = batch.to(config.dtype)
    if config.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch
