"""The augmentation configs and the per-sample parameter sampler (SEMANTICS.md §6)."""

import itertools
import math

import pytest
import torch

from sslfast.augment import (
    AugmentConfig,
    byol_configs,
    dino_configs,
    mocov2_config,
    sample_params,
    simclr_config,
)
from sslfast.reference import augment_reference
from tests.utils import DEVICES


def _gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def _random_sizes(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 400, (n, 2), generator=g)
    sizes[: n // 10, 0] = 3  # very wide images: the tries often fail, the fallback runs
    return [tuple(int(v) for v in hw) for hw in sizes]


@pytest.mark.parametrize("device", DEVICES)
def test_crop_boxes_inside_and_within_ranges(device):
    cfg = simclr_config()
    sizes = _random_sizes(5000)
    p = sample_params(len(sizes), sizes, cfg, _gen(1, device)).to("cpu")
    hw = torch.tensor(sizes, dtype=torch.float64)
    top, left = p.crop_top.double(), p.crop_left.double()
    h, w = p.crop_height.double(), p.crop_width.double()
    assert bool((h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all())
    assert bool((top + h <= hw[:, 0]).all() and (left + w <= hw[:, 1]).all())
    # boxes from a successful try: area fraction and aspect ratio in range up to rounding
    area = hw[:, 0] * hw[:, 1]
    tried = ~((h == hw[:, 0]) | (w == hw[:, 1]))  # the fallback touches an image edge
    frac = (h * w / area)[tried]
    slack = ((h + w + 1) / area)[tried]
    assert bool((frac >= cfg.crop_scale[0] - slack).all() and (frac <= 1 + 1e-9).all())
    ratio = (w / h)[tried]
    lo = ((w - 0.5) / (h + 0.5))[tried]
    hi = ((w + 0.5) / (h - 0.5).clamp_min(0.5))[tried]
    assert bool((hi >= cfg.crop_ratio[0]).all() and (lo <= cfg.crop_ratio[1]).all())
    assert ratio.numel() > 1000


def _torchvision_crop(height, width, scale, ratio, u_tries, u_off):
    """torchvision's RandomResizedCrop.make_params, written with given uniforms."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for t in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * float(u_tries[t, 0]))
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * float(u_tries[t, 1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return (int(float(u_off[0]) * (height - h + 1)), int(float(u_off[1]) * (width - w + 1)),
                    h, w)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_crop_matches_torchvision_algorithm_draw_for_draw():
    """Replaying the sampler's uniforms through torchvision's scalar algorithm gives
    the same boxes (tries, integer rounding, offsets, fallback)."""
    cfg = simclr_config().replace(crop_scale=(0.5, 1.0))
    sizes = _random_sizes(2000, seed=3)
    p = sample_params(len(sizes), sizes, cfg, _gen(7))
    g = _gen(7)
    u_tries = torch.rand(len(sizes), 10, 2, generator=g).double()
    u_off = torch.rand(len(sizes), 2, generator=g).double()
    fallbacks = 0
    for i, (hh, ww) in enumerate(sizes):
        expected = _torchvision_crop(hh, ww, cfg.crop_scale, cfg.crop_ratio, u_tries[i], u_off[i])
        got = (int(p.crop_top[i]), int(p.crop_left[i]), int(p.crop_height[i]),
               int(p.crop_width[i]))
        assert got == expected, (hh, ww, got, expected)
        fallbacks += expected[0] == (hh - expected[2]) // 2 and hh < 10
    assert fallbacks > 10


def test_fallback_equals_torchvision():
    """Where no try can fit, the box is torchvision's own fallback."""
    from torchvision.transforms import v2

    for h, w, scale in ((10, 1000, (0.9, 1.0)), (1000, 10, (0.9, 1.0)), (3, 400, (0.5, 1.0))):
        cfg = simclr_config().replace(crop_scale=scale)
        p = sample_params(3, (h, w), cfg, _gen(0))
        tv = v2.RandomResizedCrop(224, scale=scale, ratio=cfg.crop_ratio)
        ref = tv.make_params([torch.empty(3, h, w)])
        for i in range(3):
            assert (int(p.crop_top[i]), int(p.crop_left[i]), int(p.crop_height[i]),
                    int(p.crop_width[i])) == (ref["top"], ref["left"], ref["height"],
                                               ref["width"])


@pytest.mark.parametrize("cfg", [simclr_config(), byol_configs()[1], dino_configs()[2]],
                         ids=["simclr", "byol-view2", "dino-local"])
def test_probabilities_within_three_sigma(cfg):
    n = 10_000
    p = sample_params(n, (256, 256), cfg, _gen(11))
    for flag, prob in ((p.flip, cfg.flip_p), (p.jitter, cfg.jitter_p), (p.grayscale, cfg.gray_p),
                       (p.blur_sigma > 0, cfg.blur_p), (p.solarize, cfg.solarize_p)):
        sigma = math.sqrt(n * prob * (1 - prob))
        assert abs(int(flag.sum()) - n * prob) <= 3 * sigma + 1e-9, (prob, int(flag.sum()))


def test_factor_ranges_and_neutral_values():
    cfg = simclr_config()
    p = sample_params(5000, (64, 64), cfg, _gen(5))
    j = p.jitter
    for name, v in (("brightness", cfg.brightness), ("contrast", cfg.contrast),
                    ("saturation", cfg.saturation)):
        f = getattr(p, name)
        assert bool((f[j] >= max(0, 1 - v)).all() and (f[j] <= 1 + v).all())
        assert bool((f[~j] == 1).all())
        assert float(f[j].std()) > 0.1
    assert bool((p.hue[j].abs() <= cfg.hue).all() and (p.hue[~j] == 0).all())
    s = p.blur_sigma[p.blur_sigma > 0]
    assert bool((s >= 0.1).all() and (s <= 2.0).all())
    assert p.jitter_order.dtype == torch.int64 and p.crop_top.dtype == torch.int64
    assert bool((p.jitter_order.sort(dim=1).values == torch.arange(4)).all())


def test_jitter_orders_are_uniform_permutations():
    n = 24_000
    p = sample_params(n, (32, 32), simclr_config(), _gen(13))
    perms = {perm: i for i, perm in enumerate(itertools.permutations(range(4)))}
    counts = torch.zeros(24)
    for row in p.jitter_order.tolist():
        counts[perms[tuple(row)]] += 1
    chi2 = float(((counts - n / 24) ** 2 / (n / 24)).sum())
    assert chi2 < 49.7, chi2  # 99.9th percentile of chi-square with 23 degrees of freedom


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_parameters(device):
    cfg = mocov2_config()
    a = sample_params(64, (100, 120), cfg, _gen(42, device))
    b = sample_params(64, (100, 120), cfg, _gen(42, device))
    c = sample_params(64, (100, 120), cfg, _gen(43, device))
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        assert x.device.type == device and torch.equal(x, y), name
    assert not torch.equal(a.crop_top, c.crop_top)


def test_image_sizes_forms():
    cfg = simclr_config()
    a = sample_params(3, (50, 60), cfg, _gen(1))
    b = sample_params(3, [(50, 60)] * 3, cfg, _gen(1))
    c = sample_params(3, torch.tensor([[50, 60]] * 3), cfg, _gen(1))
    assert torch.equal(a.crop_width, b.crop_width) and torch.equal(a.crop_width, c.crop_width)
    assert len(sample_params(0, [], cfg)) == 0


def test_presets_follow_the_semantics_table():
    s, m = simclr_config(), mocov2_config()
    assert (s.crop_scale, s.brightness, s.hue, s.jitter_p, s.gray_p, s.blur_p) == \
        ((0.08, 1.0), 0.8, 0.2, 0.8, 0.2, 0.5)
    assert (m.crop_scale, m.brightness, m.hue, m.blur_p) == ((0.2, 1.0), 0.4, 0.1, 0.5)
    v1, v2 = byol_configs()
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert (v1.saturation, v1.hue) == (0.2, 0.1)
    g1, g2, local = dino_configs()
    assert (g1.crop_scale, g1.blur_p, g2.blur_p, g2.solarize_p) == ((0.4, 1.0), 1.0, 0.1, 0.2)
    assert (local.output_size, local.crop_scale, local.blur_p) == (96, (0.05, 0.4), 0.5)
    assert (s.kernel_size, local.kernel_size) == (23, 9)
    assert s.replace(output_size=96).kernel_size == 9  # follows the output size unless set


@pytest.mark.parametrize("changes, match", [
    ({"crop_scale": (0.0, 1.0)}, "crop_scale must lie in"),
    ({"crop_scale": (0.5, 1.2)}, "crop_scale must lie in"),
    ({"crop_scale": (0.8, 0.2)}, "crop_scale must be a .min, max. pair"),
    ({"crop_ratio": (0.0, 1.0)}, "crop_ratio must lie in"),
    ({"crop_ratio": 1.0}, "crop_ratio must be a .min, max. pair"),
    ({"flip_p": 1.5}, "flip_p must be a probability"),
    ({"blur_p": -0.1}, "blur_p must be a probability"),
    ({"hue": 0.7}, "hue must be in"),
    ({"brightness": -1}, "brightness must be a non-negative"),
    ({"blur_kernel_size": 22}, "blur_kernel_size must be odd"),
    ({"output_size": 0}, "output_size must be an int"),
    ({"mean": (0.5, 0.5)}, "mean must be 3 numbers"),
    ({"std": (1.0, 0.0, 1.0)}, "std must be positive"),
    ({"blur_sigma": (0.0, 2.0)}, "blur_sigma must lie in"),
])
def test_bad_config_names_the_argument(changes, match):
    with pytest.raises(ValueError, match=match):
        AugmentConfig(**changes)


def test_bad_sampler_input():
    cfg = simclr_config()
    with pytest.raises(TypeError, match="dtype must be"):
        AugmentConfig(dtype=torch.int8)
    with pytest.raises(TypeError, match="config must be an AugmentConfig"):
        sample_params(2, (8, 8), {"output_size": 8})
    with pytest.raises(ValueError, match="batch_size must be an int"):
        sample_params(-1, (8, 8), cfg)
    with pytest.raises(ValueError, match="image_sizes has 3 entries for batch_size 2"):
        sample_params(2, [(8, 8)] * 3, cfg)
    with pytest.raises(ValueError, match="image_sizes must be positive"):
        sample_params(2, (0, 8), cfg)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sample_params(2, (8, 8), cfg, generator=3)


def test_reference_pipeline_shapes_and_identity_case():
    """The definition: with every random op off and the whole image as the crop,
    it is a resize and a normalization."""
    imgs = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    cfg = AugmentConfig(output_size=20, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0,
                        jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0,
                        dtype=torch.bfloat16, channels_last=True)
    p = sample_params(2, (40, 40), cfg, _gen(0))
    out = augment_reference(imgs, p, cfg)
    assert out.shape == (2, 3, 20, 20) and out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    from torchvision.transforms.v2 import functional as F

    expected = F.normalize(F.resize(imgs.float() / 255, [20, 20], antialias=True),
                           list(cfg.mean), list(cfg.std))
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="2 images but parameters for 3"):
        augment_reference(imgs, sample_params(3, (40, 40), cfg), cfg)
