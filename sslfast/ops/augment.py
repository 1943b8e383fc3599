"""SSL augmentation: validation, backend dispatch, custom-op registration.

``augment(images, params, config)`` applies ``config``'s pipeline to every image
with its own parameters (``sslfast.augment.sample_params``): SEMANTICS.md §6.

Backends: ``cuda`` (``csrc/augment/augment_cuda.cu``: a contrast-mean pre-pass
where needed, then one block per output tile that evaluates the pixel chain —
with the blur's halo in shared memory — and writes each output element once;
blur kernels above 45 taps blur in two passes over two (B, 3, S, S) float32
buffers instead),
``cpu`` (``csrc/augment/augment_cpu.cpp``: one task per image, the whole
pipeline in a cache-resident buffer) and ``reference`` (torchvision's
functional ops per sample). Without the compiled extension the reference runs
(per sample, slow) and says so once.
"""

import torch

from sslfast import _extension
from sslfast._backend import resolve_backend
from sslfast.reference.augment import augment_reference

_IMPLEMENTED = ("cpu", "cuda", "reference")
_CONFIG_FIELDS = ("output_size", "kernel_size", "mean", "std", "dtype", "channels_last")
_PARAM_FIELDS = ("crop_top", "crop_left", "crop_height", "crop_width", "flip", "jitter",
                 "brightness", "contrast", "saturation", "hue", "jitter_order", "grayscale",
                 "blur_sigma", "solarize")


def _image_list(images):
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) or a list of (3, H, W) tensors, got "
                             f"shape {tuple(images.shape)}")
        return list(images.unbind(0))
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a tensor or a list of tensors, got "
                        f"{type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images is an empty list")
    return list(images)


def _check_images(images):
    device = images[0].device if isinstance(images[0], torch.Tensor) else None
    out = []
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor):
            raise TypeError(f"images[{i}] must be a tensor, got {type(img).__name__}")
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"images[{i}] must have 3 channels (3, H, W), got shape "
                             f"{tuple(img.shape)}")
        if img.shape[1] == 0 or img.shape[2] == 0:
            raise ValueError(f"images[{i}] is empty (shape {tuple(img.shape)})")
        if img.dtype != torch.uint8 and not img.is_floating_point():
            raise TypeError(f"images[{i}] must be uint8 or floating point in [0, 1], got "
                            f"{img.dtype}")
        if img.device != device:
            raise ValueError(f"images[{i}] is on {img.device} but images[0] is on {device}")
        out.append(img if img.dtype in (torch.uint8, torch.float32) else img.float())
    return out


def _check_boxes(boxes, imgs):
    """Crop boxes (host-resident, (B, 4) top, left, height, width) inside their
    images: checked here, before they travel to a GPU, where checking would sync
    (the CUDA kernel then reads edge pixels for a box outside its image)."""
    sizes = torch.tensor([[int(x.shape[1]), int(x.shape[2])] for x in imgs], dtype=torch.int64)
    top_left, hw = boxes[:, :2], boxes[:, 2:]
    bad = ((top_left < 0) | (hw <= 0) | (top_left + hw > sizes)).any(dim=1).nonzero()
    if len(bad):
        i = int(bad[0])
        top, left, h, w = (int(v) for v in boxes[i])
        raise ValueError(f"params: crop box {i} (top {top}, left {left}, height {h}, width {w}) is "
                         f"not inside images[{i}] of size {sizes[i, 0]}x{sizes[i, 1]}")


def _pack(params, imgs, device):
    """The kernels' parameter tensors, stacked where the parameters are (one
    transfer each when they are drawn on the CPU for GPU images)."""
    boxes = torch.stack([params.crop_top, params.crop_left, params.crop_height,
                         params.crop_width], dim=1).to(dtype=torch.int64)
    flags = torch.stack([params.flip, params.jitter, params.grayscale, params.solarize],
                        dim=1).to(dtype=torch.uint8)
    factors = torch.stack([params.brightness, params.contrast, params.saturation, params.hue,
                           params.blur_sigma], dim=1).to(dtype=torch.float32)
    order = params.jitter_order.to(dtype=torch.int64)
    if boxes.device.type == "cpu" and device.type != "cpu":  # on the CPU the op checks them
        _check_boxes(boxes, imgs)
    return tuple(t.to(device).contiguous() for t in (boxes, flags, factors, order))


def augment(images, params, config, *, backend="auto"):
    """(B, 3, S, S) views of ``images`` under ``config`` with ``params``.

    Args:
        images: a uint8 (B, 3, H, W) tensor, a list of uint8 (3, Hi, Wi) tensors
            of different sizes, or floating-point images in [0, 1].
        params: ``AugmentParams`` for B samples (``sample_params``).
        config: the ``AugmentConfig`` the parameters were drawn for (output
            size, blur kernel, normalization, output dtype and layout).
        backend: "auto", "cpu", "cuda" or "reference".
    """
    # Duck-typed: the config and parameter classes live in the layer above (sslfast.augment).
    if not all(hasattr(config, a) for a in _CONFIG_FIELDS):
        raise TypeError(f"config must be an AugmentConfig, got {type(config).__name__}")
    if not all(hasattr(params, a) for a in _PARAM_FIELDS):
        raise TypeError(f"params must be AugmentParams, got {type(params).__name__}")
    imgs = _check_images(_image_list(images))
    if len(params) != len(imgs):
        raise ValueError(f"{len(imgs)} images but params for {len(params)} samples")
    if config.kernel_size // 2 >= config.output_size:
        raise ValueError(f"blur kernel size {config.kernel_size} is too large for output size "
                         f"{config.output_size}")
    device = imgs[0].device
    name = resolve_backend(backend, device, "augment", _IMPLEMENTED)
    compiled = _extension.has_cuda_kernels() if name == "cuda" else _extension.has_cpu_kernels()
    if name in ("cpu", "cuda") and compiled:
        boxes, flags, factors, order = _pack(params, imgs, device)
        return torch.ops.sslfast.augment(imgs, boxes, flags, factors, order, config.output_size,
                                         config.kernel_size, list(config.mean), list(config.std),
                                         config.dtype, config.channels_last)
    if name != "reference":
        _extension.warn_fallback("augment", device.type)
    return augment_reference(imgs, params.to(device), config).to(device)


def _register_fake():
    if _extension.extension() is None:
        return

    @torch.library.register_fake("sslfast::augment")
    def _augment_fake(images, boxes, flags, factors, order, size, kernel_size, mean, std, dtype,
                      channels_last):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return boxes.new_empty((len(images), 3, size, size), dtype=dtype).contiguous(
            memory_format=fmt)


_register_fake()
