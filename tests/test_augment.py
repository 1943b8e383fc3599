"""The fused augmentation (sslfast.functional.augment) against the definition:
torchvision.transforms.v2.functional per sample (SEMANTICS.md §6)."""

import re

import pytest
import torch

from sslfast import _extension
from sslfast.augment import (
    AugmentConfig,
    BYOLAugment,
    DINOAugment,
    MoCoV2Augment,
    SimCLRAugment,
    sample_params,
    simclr_config,
)
from sslfast.functional import augment
from sslfast.reference import augment_reference
from tests import cuda_emu
from tests.utils import CUDA_KERNEL_DEVICES, KERNEL_DEVICES

OFF = AugmentConfig(output_size=32, flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0,
                    solarize_p=0.0)
SUB_OPS = {
    "resize": {},
    "resize-up": {"crop_scale": (0.01, 0.05)},  # small crops: upsampling
    "flip": {"flip_p": 1.0},
    "brightness": {"jitter_p": 1.0, "brightness": 0.8, "contrast": 0, "saturation": 0, "hue": 0},
    "contrast": {"jitter_p": 1.0, "brightness": 0, "contrast": 0.8, "saturation": 0, "hue": 0},
    "saturation": {"jitter_p": 1.0, "brightness": 0, "contrast": 0, "saturation": 0.8, "hue": 0},
    "hue": {"jitter_p": 1.0, "brightness": 0, "contrast": 0, "saturation": 0, "hue": 0.5},
    "grayscale": {"gray_p": 1.0},
    "blur": {"blur_p": 1.0},
    "solarize": {"solarize_p": 1.0},
}


def _batch(n, seed, lo=20, hi=90, dtype=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    sizes = [(int(h), int(w)) for h, w in torch.randint(lo, hi, (n, 2), generator=g)]
    imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    if dtype != torch.uint8:
        imgs = [x.to(dtype) / 255 for x in imgs]
    return imgs, sizes


def _err01(out, ref, cfg):
    """max |out - ref| on the [0, 1] scale (undoing the normalization)."""
    std = torch.tensor(cfg.std)[None, :, None, None]
    return float(((out.float().cpu() - ref.float().cpu()) * std).abs().max())


def _check(cfg, n, seed, device="cpu", dtype=torch.uint8, tol=2e-3):
    imgs, sizes = _batch(n, seed, dtype=dtype)
    params = sample_params(n, sizes, cfg, torch.Generator().manual_seed(seed))
    out = augment([x.to(device) for x in imgs], params.to(device), cfg)
    ref = augment_reference(imgs, params, cfg)
    assert out.shape == (n, 3, cfg.output_size, cfg.output_size) and out.dtype == cfg.dtype
    err = _err01(out, ref, cfg)
    assert err <= tol, err
    return out


needs_kernels = pytest.mark.skipif(not _extension.has_cpu_kernels(), reason="no compiled kernels")


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("op", list(SUB_OPS))
def test_each_sub_op_alone(op, device):
    _check(OFF.replace(**SUB_OPS[op]), 8, seed=len(op), device=device)


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_whole_pipeline_random_sizes_and_parameters(seed, device):
    cfg = simclr_config(output_size=40).replace(solarize_p=0.5, blur_p=0.7)
    _check(cfg, 24, seed, device=device)


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_blur_kernels_beyond_the_haloed_tile(device):
    """Blur kernels above 45 taps (CUDA: two passes over global memory, not the
    haloed tile), in a batch of blurred and unblurred, solarized, contrast-adjusted
    samples, in every output layout."""
    cfg = simclr_config(output_size=48).replace(blur_kernel_size=61, blur_p=0.5, solarize_p=0.5,
                                                jitter_p=1.0)
    _check(cfg, 10, seed=5, device=device)
    _check(cfg.replace(blur_kernel_size=95, channels_last=True), 6, seed=6, device=device)


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_float_inputs_batch_tensor_and_output_layouts(device):
    cfg = simclr_config(output_size=24, dtype=torch.bfloat16, channels_last=True)
    imgs, sizes = _batch(6, 5, lo=30, hi=31, dtype=torch.float32)  # one size: a batch tensor
    batch = torch.stack(imgs)
    params = sample_params(6, sizes, cfg, torch.Generator().manual_seed(1))
    out = augment(batch.to(device), params.to(device), cfg)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    ref = augment_reference(batch, params, cfg.replace(dtype=torch.float32))
    assert _err01(out, ref, cfg) <= 2e-3 + 8e-3 * 3  # plus one bf16 rounding of values up to ~3
    out16 = augment(batch.to(device), params.to(device),
                    cfg.replace(dtype=torch.float16, channels_last=False))
    assert out16.dtype == torch.float16 and out16.is_contiguous()
    # uint8 images in an (H, W, C) layout: strided channels
    hwc = (batch * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    cfg32 = cfg.replace(dtype=torch.float32, channels_last=False)
    assert _err01(augment(hwc.to(device), params.to(device), cfg32),
                  augment_reference(hwc.contiguous(), params, cfg32), cfg) <= 2e-3


@pytest.mark.cuda_emu
def test_cuda_emu_large_blur_over_many_samples():
    """More samples than one block of the taps kernel makes taps for (256)."""
    cfg = simclr_config(output_size=24).replace(blur_kernel_size=47, blur_p=1.0)
    with cuda_emu.emulate() as ops:
        _check(cfg, 260, seed=2)
        assert "_augment_taps_kernel grid=(2,1,1)" in ops._launches()


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_same_parameters_same_output_bitwise(device):
    cfg = simclr_config(output_size=32)
    imgs, sizes = _batch(8, 9)
    imgs = [x.to(device) for x in imgs]
    p = sample_params(8, sizes, cfg, torch.Generator(device=device).manual_seed(3))
    assert torch.equal(augment(imgs, p, cfg), augment(imgs, p, cfg))
    if device == "cuda":
        return
    a = SimCLRAugment(32)(imgs, torch.Generator().manual_seed(4))
    b = SimCLRAugment(32)(imgs, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])  # two views, independent parameters


@pytest.mark.cuda_emu
def test_cuda_emu_haloed_blur_fits_every_target_gpu():
    """The largest blur kernel that takes the haloed tile (45 taps) opts into the
    shared memory of sm_86/sm_89 (99 KiB, the least of the GPUs the kernel is written
    for); 47 taps take the two passes over global memory."""
    for taps, haloed in ((45, True), (47, False)):
        cfg = simclr_config(output_size=36).replace(blur_kernel_size=taps, blur_p=1.0)
        with cuda_emu.emulate(optin_smem_bytes=cuda_emu.SM86_SMEM) as ops:
            _check(cfg, 3, seed=taps)
            launches = ops._launches()
        assert ("_augment_blur_pass_kernel" in launches) != haloed, launches
        smem = max(int(v) for v in re.findall(r"smem=(\d+)", launches))
        assert (smem > 48 * 1024) == haloed, launches


@pytest.mark.cuda_emu
def test_cuda_emu_same_bits_in_any_order_and_close_to_the_cpu_kernel():
    """Blocks and threads in four orders give the same bits (the contrast mean's
    partials are summed in a fixed order; the halo is complete before it is read);
    the result is the CPU kernel's but for the contrast mean's summation order."""
    cfg = simclr_config(output_size=40).replace(solarize_p=0.5, blur_p=0.5)
    imgs, sizes = _batch(12, 3)
    p = sample_params(12, sizes, cfg, torch.Generator().manual_seed(3))
    outs = []
    for seed in (0, 1, 2, 3):
        with cuda_emu.emulate(seed=seed):
            outs.append(augment(imgs, p, cfg))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    with cuda_emu.native():
        cpu = augment(imgs, p, cfg)
    assert _err01(outs[0], cpu, cfg) <= 1e-5


def test_presets_make_all_views():
    imgs = torch.randint(0, 256, (3, 3, 50, 60), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    assert [v.shape for v in SimCLRAugment(32)(imgs, g)] == [(3, 3, 32, 32)] * 2
    assert len(MoCoV2Augment(32)(imgs, g)) == 2
    v1, v2 = BYOLAugment(32).configs
    assert (v1.blur_p, v2.solarize_p) == (1.0, 0.2)
    views = DINOAugment(n_local_views=3, global_size=32, local_size=16)(imgs, g)
    assert [v.shape[-1] for v in views] == [32, 32, 16, 16, 16]
    with pytest.raises(ValueError, match="n_local_views"):
        DINOAugment(n_local_views=-1)


@needs_kernels
def test_opcheck_and_compile():
    cfg = simclr_config(output_size=16)
    imgs, sizes = _batch(3, 2, lo=20, hi=30)
    p = sample_params(3, sizes, cfg, torch.Generator().manual_seed(0))
    from sslfast.ops.augment import _pack

    args = (imgs, *_pack(p, imgs, torch.device("cpu")), 16, cfg.kernel_size, list(cfg.mean),
            list(cfg.std), torch.float32, False)
    torch.library.opcheck(torch.ops.sslfast.augment.default, args)


def test_bad_input_names_the_argument():
    cfg = simclr_config(output_size=16)
    imgs, sizes = _batch(2, 0)
    p = sample_params(2, sizes, cfg)
    with pytest.raises(ValueError, match=r"images\[1\] must have 3 channels"):
        augment([imgs[0], imgs[1][:2]], p, cfg)
    with pytest.raises(TypeError, match=r"images\[0\] must be uint8 or floating point"):
        augment([imgs[0].int(), imgs[1]], p, cfg)
    with pytest.raises(ValueError, match="images is an empty list"):
        augment([], p, cfg)
    with pytest.raises(ValueError, match="images must be .B, 3, H, W."):
        augment(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), p, cfg)
    with pytest.raises(ValueError, match="2 images but params for 3 samples"):
        augment(imgs, sample_params(3, (30, 30), cfg), cfg)
    with pytest.raises(TypeError, match="config must be an AugmentConfig"):
        augment(imgs, p, {"output_size": 16})
    with pytest.raises(ValueError, match="too large for output size"):
        augment(imgs, p, cfg.replace(blur_kernel_size=33))


@needs_kernels
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_crop_box_outside_the_image_is_rejected(device):
    """Boxes drawn on the CPU are checked before they travel to the images' device."""
    cfg = simclr_config(output_size=16)
    imgs, sizes = _batch(2, 0, lo=30, hi=31)
    p = sample_params(2, sizes, cfg)
    p.crop_top[1] = 29
    p.crop_height[1] = 5
    with pytest.raises(ValueError, match="crop box 1 .* is not inside images"):
        augment([x.to(device) for x in imgs], p, cfg)
    from sslfast.ops.augment import _pack  # boxes leaving the host: checked in Python

    with pytest.raises(ValueError, match="params: crop box 1 .* is not inside images"):
        _pack(p, imgs, torch.device("meta"))


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
def test_cuda_box_outside_the_image_reads_inside(device, _cuda_emu):
    """Device-resident boxes are not checked (that would sync); one outside its
    image reads the image's edge pixels, never memory beyond it (emulated: the CPU
    boxes count as device memory, AddressSanitizer watches the reads)."""
    cfg = OFF.replace(output_size=8)
    img = torch.randint(0, 256, (1, 3, 12, 12), dtype=torch.uint8)
    p = sample_params(1, (12, 12), cfg, torch.Generator().manual_seed(0))
    for name, v in (("crop_top", 8), ("crop_left", -4), ("crop_height", 8), ("crop_width", 8)):
        getattr(p, name).fill_(v)
    if _cuda_emu is None:
        out = augment(img.to(device), p.to(device), cfg)
    else:
        with cuda_emu.emulate(cpu_tensors_are_host=False):
            out = augment(img, p, cfg)
    ys, xs = (torch.arange(8) + 8).clamp(max=11), (torch.arange(8) - 4).clamp(min=0)
    clamped = img[:, :, ys][:, :, :, xs].contiguous()  # the box's pixels, edge-clamped
    for name, v in (("crop_top", 0), ("crop_left", 0)):
        getattr(p, name).fill_(v)
    assert _err01(out, augment_reference(clamped, p, cfg), cfg) <= 2e-3


def test_reference_backend_and_fallback_warning(recwarn):
    cfg = simclr_config(output_size=16)
    imgs, sizes = _batch(2, 1)
    p = sample_params(2, sizes, cfg)
    ref = augment(imgs, p, cfg, backend="reference")
    assert torch.equal(ref, augment_reference(imgs, p, cfg))


@needs_kernels
def test_bad_jitter_order_values_are_skipped_not_read():
    """A hand-made order outside 0..3 is ignored (no out-of-bounds read)."""
    cfg = OFF.replace(jitter_p=1.0, brightness=0.5, contrast=0, saturation=0, hue=0)
    imgs, sizes = _batch(2, 3)
    p = sample_params(2, sizes, cfg, torch.Generator().manual_seed(0))
    expected = augment(imgs, p, cfg)
    p.jitter_order[:, 1:] = torch.tensor([7, -3, 99])
    p.jitter_order[:, 0] = 0
    assert torch.equal(augment(imgs, p, cfg), expected)


@pytest.mark.cuda
def test_cuda_large_batch_and_no_host_sync():
    """More samples than a grid's y dimension allows (65535) and no host sync."""
    from tests.utils import assert_no_host_sync

    cfg = simclr_config(output_size=8).replace(blur_kernel_size=3)
    imgs = torch.randint(0, 256, (70000, 3, 10, 10), dtype=torch.uint8, device="cuda")
    p = sample_params(70000, (10, 10), cfg, torch.Generator(device="cuda").manual_seed(0))
    out = augment(imgs, p, cfg)
    idx = [0, 65535, 69999]
    ref = augment_reference(imgs[idx].cpu(), _subset(p, idx), cfg)
    assert _err01(out[idx], ref, cfg) <= 2e-3
    first, sub = imgs[:64], _subset(p, list(range(64)))
    assert_no_host_sync(lambda: augment(first, sub, cfg))


def _subset(p, idx):
    from sslfast.augment import AugmentParams

    return AugmentParams(**{k: getattr(p, k)[idx] for k in p.__dataclass_fields__})
