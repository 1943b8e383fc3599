"""Per-sample SSL augmentation: views per second for a method's preset, from a
uint8 batch of 256 x 256 images.

Providers:
  torchvision_loop   torchvision.transforms.v2 pipeline applied per image (per-sample
                     parameters; what a DataLoader worker runs)
  torchvision_batch  the same pipeline called once on the whole batch (one set of
                     parameters shared by the batch)
  kornia             kornia.augmentation.AugmentationSequential (per-sample), where
                     installed
  sslfast            the preset (SimCLRAugment / DINOAugment) over sslfast.functional.augment
  sslfast_jpeg       end to end from JPEG bytes: the training loop's decode_images
                     (torchvision.io.decode_jpeg on the device, nvJPEG on a GPU), then
                     the preset

Cases (GPU): SimCLR (2 views of 224², B = 256) and DINO (2 x 224² + 8 x 96², B = 256);
on the CPU B = 32 (SimCLR) and 16 (DINO). Figures: views/s, and the bytes read and
written (uint8 source, fp32 output) as GB/s against the measured memory bandwidth.

    python -m sslfast.bench --ops augment [--quick] [--device cpu|cuda] [--no-write]
    python benchmarks/bench_augment.py [--quick] [--device cpu|cuda] [--no-write]
"""

import torch

from sslfast.augment import DINOAugment, SimCLRAugment
from sslfast.bench import harness

OP = "augment"
# Every provider the benchmark may run (those not installed are skipped with a note).
PROVIDER_NAMES = ["torchvision_loop", "torchvision_batch", "kornia", "sslfast", "sslfast_jpeg"]
SOURCE = 256


def cases(device, quick):
    """(preset, batch size, global output size)."""
    if quick:
        return [("simclr", 8, 64)]
    b = 256 if device.type == "cuda" else None
    return [("simclr", b or 32, 224), ("dino", b or 16, 224)]


def _preset(name, size):
    return SimCLRAugment(size) if name == "simclr" else \
        DINOAugment(8, global_size=size, local_size=max(16, size * 96 // 224))


def _torchvision_pipeline(cfg):
    from torchvision.transforms import v2

    return v2.Compose([
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomResizedCrop(cfg.output_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio,
                             antialias=True),
        v2.RandomHorizontalFlip(cfg.flip_p),
        v2.RandomApply([v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)],
                       p=cfg.jitter_p),
        v2.RandomGrayscale(cfg.gray_p),
        v2.RandomApply([v2.GaussianBlur(cfg.kernel_size, cfg.blur_sigma)], p=cfg.blur_p),
        v2.RandomSolarize(0.5, p=cfg.solarize_p),
        v2.Normalize(list(cfg.mean), list(cfg.std)),
    ])


def _kornia_pipeline(cfg):
    import kornia.augmentation as K

    return K.AugmentationSequential(
        K.RandomResizedCrop((cfg.output_size, cfg.output_size), scale=cfg.crop_scale,
                            ratio=cfg.crop_ratio),
        K.RandomHorizontalFlip(p=cfg.flip_p),
        K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.jitter_p),
        K.RandomGrayscale(p=cfg.gray_p),
        K.RandomGaussianBlur((cfg.kernel_size, cfg.kernel_size), cfg.blur_sigma, p=cfg.blur_p),
        K.RandomSolarize(thresholds=0.0, additions=0.0, p=max(cfg.solarize_p, 1e-6)),
        K.Normalize(torch.tensor(cfg.mean), torch.tensor(cfg.std)),
    )


def providers(case, device):
    """name -> a callable producing every view of one batch."""
    name, batch, size = case
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, SOURCE, SOURCE), dtype=torch.uint8,
                           generator=g).to(device)
    preset = _preset(name, size)
    out = {}
    pipes = [_torchvision_pipeline(cfg) for cfg in preset.configs]
    out["torchvision_loop"] = lambda: [torch.stack([p(img) for img in images]) for p in pipes]
    out["torchvision_batch"] = lambda: [p(images) for p in pipes]
    try:
        kpipes = [_kornia_pipeline(cfg).to(device) for cfg in preset.configs]
        out["kornia"] = lambda: [p(images.float() / 255) for p in kpipes]
    except Exception as exc:  # noqa: BLE001 - not installed, or not importable here
        print(f"  kornia unavailable ({type(exc).__name__}: {exc}): skipped")
    gen = torch.Generator(device=device).manual_seed(1)
    out["sslfast"] = lambda: preset(images, gen)
    try:
        from torchvision.io import encode_jpeg

        from sslfast.pretrain.data import decode_images  # the training loop's decode

        jpegs = [encode_jpeg(img, quality=90) for img in images.cpu()]
        out["sslfast_jpeg"] = lambda: preset(decode_images(jpegs, device), gen)
    except (ImportError, RuntimeError) as exc:
        print(f"  JPEG decoding unavailable ({exc}): sslfast_jpeg skipped")
    return out


def run(device, quick=False, write=True, progress=None, ceil=None, select=None):
    env = harness.environment(device)
    print(f"augment benchmark on {env['device']} (torch {env['torch']})")
    ceil = ceil or harness.ceilings(device, quick)
    records = []
    for case in harness.selected(cases(device, quick), select):
        name, batch, size = case
        if progress:
            progress(f"{OP}: {name} B={batch} {size}px")
        provs = providers(case, device)
        n_views = len(_preset(name, size).configs)
        out_px = sum(c.output_size ** 2 for c in _preset(name, size).configs)
        # uint8 source read once per view, fp32 output written once
        n_bytes = batch * (n_views * 3 * SOURCE * SOURCE + 3 * out_px * 4)
        measured = harness.trial_runs(provs)
        measured.update(harness.measure_all(provs, device, quick, min_runs=3))
        shape = f"{name}: B={batch} {SOURCE}px -> {n_views} views ({size}px)"
        rows = []
        for pname, m in measured.items():
            r = {**env, "op": OP, "provider": pname, "model": name, "shape": shape,
                 "dtype": "uint8->float32", "rows": batch, "views": n_views, "quick": quick,
                 "ceilings": ceil, "ceiling_gbps": ceil["mem_gbps"], **m}
            if "median_ms" in m:
                r["views_per_s"] = batch * n_views / (m["median_ms"] / 1e3)
                r["gbps"] = n_bytes / m["median_ms"] / 1e6
                r["pct_of_peak"] = 100 * r["gbps"] / ceil["mem_gbps"]
            rows.append(r)
        harness.add_speedups(rows, reference="torchvision_loop")
        print(f"\n  {shape}")
        harness.print_table(rows, ["provider", "median_ms", "p20_ms", "p80_ms", "peak_mem_bytes",
                                   "views_per_s", "gbps", "pct_of_peak", "speedup_vs_reference",
                                   "speedup_vs_best_other"])
        records += rows
        del provs
    return harness.finish(OP, records, write)


def main(argv=None):
    harness.cli(run, __doc__, argv)
