"""SimCLR pretraining throughput, end to end from JPEG bytes: images per second of
the whole training step pipeline (loader, decoding, two augmented views, ResNet +
projection head, NT-Xent, backward, SGD) on one device.

Providers:
  torchvision_lightly  what users run today: DataLoader workers (one per CPU core,
                       persistent, pinned memory on a GPU) decode each JPEG on the CPU
                       (torchvision.io.decode_jpeg) and apply the torchvision.transforms.v2
                       SimCLR pipeline twice per image (crop and flip on uint8, the rest in
                       float32); the collated views are copied to the device (non_blocking),
                       then torchvision's ResNet + lightly's SimCLRProjectionHead, one forward
                       pass per view (lightly's example), lightly.loss.NTXentLoss(0.5)
  sslfast              workers only read the bytes (sslfast.pretrain.data.make_loader);
                       decode_images on the device (batched nvJPEG on a GPU), method.augment
                       (fused per-sample augmentation; bf16 channels-last views on a GPU),
                       loss = SimCLR(backbone)(views) (fused NT-Xent): the pretraining
                       command's own step (sslfast.pretrain.train.train_step)

Both: the same weights (same seed), channels-last, bf16 autocast on a GPU (fp32 on the
CPU), SGD (momentum 0.9), backward and step, the loader cycling over the images without
epoch boundaries. The images: JPEGs (quality 90) of smooth random content plus noise,
random sizes around the case's source size, generated once per process (seeded).

Cases (GPU): ResNet-50, B = 256, 2 views of 224², from 512 JPEGs of about 500 x 375
(~100 kB, like ImageNet's); 5 warm-up steps, then at least 20 timed, a multiple of the
number of workers (32 in 8 chunks with 16 workers). CPU: ResNet-18, B = 16, 2 x 96²
from 64 JPEGs of about 160 x 120; 1 warm-up step, at least 3 timed (4 with 2 workers),
timed one by one. --quick: a tiny CNN
(sslfast.pretrain.backbones.tiny_convnet), B = 8, 2 x 32² from 16 JPEGs of about 64 x 48;
1 + 2 steps.

Figures: images/s (timed steps x B / wall clock, synchronized at the ends), the median
step time with p20/p80 over the chunks; step_images_per_s (the same step without the
loader: its last batch again), data_bound_share (1 - images/s / step_images_per_s: the
time lost to the input pipeline), loader_wait_share (host time blocked in next(loader));
peak memory (model, optimizer state and activations: on a GPU the allocator's peak over
the run, on the CPU the state's bytes plus what one step allocates at its peak, main
process only) and workers_uss_bytes (the private memory of the loader workers after the
timed steps); model TFLOP/s (encoder forward + backward, FlopCounterMode) and its share
of the matmul rate measured in the run (MFU); speedups in images/s over
torchvision_lightly. A provider losing more than 10 % of its time to the input
pipeline is reported data-bound, else compute-bound.

    python -m sslfast.bench --ops pretrain [--quick] [--device cpu|cuda] [--no-write]
    python benchmarks/bench_pretrain.py [--quick] [--device cpu|cuda] [--no-write]
"""

import contextlib
import functools
import gc
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sslfast.bench import harness

OP = "pretrain"
# Every provider the benchmark may run (those not installed are skipped with a note).
PROVIDER_NAMES = ["torchvision_lightly", "sslfast"]
TEMPERATURE = 0.5
LOOP_LENGTH = 10**9  # the loaders' virtual length: no epoch ends within a run


def cases(device, quick):
    """(backbone, batch size B, crop size, source width, source height, images)."""
    if quick:
        return [("tiny", 8, 32, 64, 48, 16)]
    if device.type == "cuda":
        return [("resnet50", 256, 224, 500, 375, 512)]
    return [("resnet18", 16, 96, 160, 120, 64)]


def schedule(device, quick):
    """(warm-up steps, timed steps, steps per timed chunk).

    The timed steps are a whole number of rounds of the loader's workers: each
    worker builds whole batches, so a loader slower than the step delivers them in
    bursts of num_workers() batches, and a window of whole rounds times it at its
    true rate whatever the phase it starts at."""
    if quick:
        return 1, 2, 1
    warmup, steps = (5, 20) if device.type == "cuda" else (1, 3)
    workers = num_workers()
    steps = workers * -(-steps // workers)
    return warmup, steps, max(1, steps // 8) if device.type == "cuda" else 1


def num_workers():
    """Every CPU core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---- the images ---------------------------------------------------------------------------


def _render(w, h, g):
    """A uint8 (3, h, w) image: random octaves of smooth noise (coarse to fine,
    upsampled), a brightness ramp and fine grain: a JPEG about a photo's size."""
    x = None
    for cells, amp in ((4, 0.8), (16, 0.6), (64, 0.4), (160, 0.3)):
        cells = min(cells, max(2, w // 3))
        size = (max(2, round(cells * h / w)), cells)
        noise = amp * (torch.rand(1, 3, *size, generator=g) - 0.5)
        x = noise if x is None else F.interpolate(x, size=size, mode="bilinear") + noise
    x = F.interpolate(x, size=(h, w), mode="bilinear")[0]
    ramp = torch.linspace(-0.5, 0.5, w) * float(torch.rand((), generator=g) - 0.5)
    x = x + ramp + 0.5 + 0.06 * torch.randn(3, h, w, generator=g)
    return x.mul_(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=4)
def jpegs(n, width, height, seed=0):
    """n JPEGs (quality 90, uint8 1-D tensors) of random sizes within ±20 % of
    width x height; deterministic, cached per process."""
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = int(torch.randint(round(0.8 * width), round(1.2 * width) + 1, (), generator=g))
        h = int(torch.randint(round(0.8 * height), round(1.2 * height) + 1, (), generator=g))
        out.append(encode_jpeg(_render(w, h, g), quality=90))
    return tuple(out)


class _Cycle(Dataset):
    """``dataset[i % len(dataset)]`` over LOOP_LENGTH indices: a loader without epochs."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return LOOP_LENGTH

    def __getitem__(self, index):
        return self.dataset[index % len(self.dataset)]


class _DecodeTwoViews(Dataset):
    """A DataLoader worker's job in the usual pipeline: decode one JPEG on the CPU
    and augment it twice."""

    def __init__(self, encoded, transform):
        self.encoded, self.transform = encoded, transform

    def __len__(self):
        return len(self.encoded)

    def __getitem__(self, index):
        from torchvision.io import ImageReadMode, decode_jpeg

        data, _ = self.encoded[index]
        image = decode_jpeg(data, mode=ImageReadMode.RGB)
        return self.transform(image), self.transform(image)


def torchvision_transform(cfg):
    """sslfast.bench.augment's torchvision.transforms.v2 pipeline for ``cfg``, with
    the crop and flip moved ahead of the float conversion: they run on the uint8
    image, so only the crop is converted (what a tuned loader does)."""
    from torchvision.transforms import v2

    from sslfast.bench.augment import _torchvision_pipeline

    to_float, crop, flip, *rest = _torchvision_pipeline(cfg).transforms
    if not (isinstance(to_float, v2.ToDtype) and isinstance(crop, v2.RandomResizedCrop)
            and isinstance(flip, v2.RandomHorizontalFlip)):
        raise AssertionError("sslfast.bench.augment's pipeline changed its order")
    return v2.Compose([crop, flip, to_float, *rest])


# ---- the model ----------------------------------------------------------------------------


def _backbone(name):
    """The pretraining command's backbone ``name`` (torchvision's ResNet without its
    classifier), or for ``tiny`` its small CNN at width 16 (the quick pass)."""
    from sslfast.pretrain.backbones import build_backbone, tiny_convnet

    return tiny_convnet(16) if name == "tiny" else build_backbone(name)


def _encoded_images(case):
    from sslfast.pretrain.data import EncodedImages

    _, _, _, width, height, n = case
    items = jpegs(n, width, height)
    return EncodedImages(items, torch.zeros(len(items), dtype=torch.int64))


def model_flops(case):
    """FLOPs of the encoder's forward and backward over both views (counted on the
    meta device; the loss, a few MFLOP, is left out)."""
    from torch.utils.flop_counter import FlopCounterMode

    from sslfast.methods import infer_feature_dim
    from sslfast.methods.heads import mlp

    name, batch, crop = case[:3]
    with torch.device("meta"):
        backbone = _backbone(name)
        head = mlp([infer_feature_dim(backbone, crop), 2048, 128], last_batch_norm=True)
        model = nn.Sequential(backbone, head)
        x = torch.empty(2 * batch, 3, crop, crop).contiguous(memory_format=torch.channels_last)
    model.to(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops()


class _Training:
    """One provider's training loop, built on its first call (so that building
    every provider of a case costs nothing): each call runs one step, the batch
    from the loader. ``wait_s`` adds up the time blocked in ``next(loader)``;
    ``step_only()`` runs the step again on the last batch (no loader)."""

    def __init__(self, case, device):
        self.case, self.device = case, device
        self.loader = self.batches = self.last = None
        self.wait_s = 0.0
        self.autocast = harness.autocast_to(
            device, torch.bfloat16 if device.type == "cuda" else torch.float32)

    def _optimizer(self, params):
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-6)

    def start(self):
        raise NotImplementedError

    def step(self, batch):
        raise NotImplementedError

    def __call__(self):
        if self.batches is None:
            self.start()
            self.batches = iter(self.loader)
        t0 = time.perf_counter()
        self.last = next(self.batches)
        self.wait_s += time.perf_counter() - t0
        self.step(self.last)

    def step_only(self):
        self.step(self.last)

    def state_bytes(self):
        """Bytes of the parameters, their gradients and the optimizer's state."""
        tensors = [p for group in self.optimizer.param_groups for p in group["params"]]
        tensors += [p.grad for p in tensors if p.grad is not None]
        tensors += [v for state in self.optimizer.state.values() for v in state.values()
                    if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def workers_uss_bytes(self):
        """The memory the loader workers hold on their own (private pages: their
        batches, and the pages of the parent they wrote to), or None (not Linux)."""
        workers = getattr(self.batches, "_workers", None)
        if not workers:
            return None
        total = 0
        try:
            for w in workers:
                with open(f"/proc/{w.pid}/smaps_rollup") as f:
                    total += sum(int(line.split()[1]) * 1024 for line in f
                                 if line.startswith(("Private_Clean:", "Private_Dirty:")))
        except (OSError, ValueError):
            return None
        return total

    def close(self):
        """Stops the workers and drops the model, optimizer and batches."""
        shutdown = getattr(self.batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        case, device = self.case, self.device
        self.__dict__.clear()
        self.__init__(case, device)  # unbuilt again
        gc.collect()


class TorchvisionLightly(_Training):
    def start(self):
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        from sslfast.augment import simclr_config
        from sslfast.methods import infer_feature_dim

        name, batch, crop = self.case[:3]
        torch.manual_seed(0)
        backbone = _backbone(name)
        head = SimCLRProjectionHead(infer_feature_dim(backbone, crop), 2048, 128)
        self.model = nn.Sequential(backbone, head).to(self.device)
        self.model.to(memory_format=torch.channels_last)
        self.criterion = NTXentLoss(temperature=TEMPERATURE)
        self.optimizer = self._optimizer(self.model.parameters())
        data = _DecodeTwoViews(_Cycle(_encoded_images(self.case)),
                               torchvision_transform(simclr_config(crop)))
        workers = num_workers()
        self.loader = DataLoader(data, batch_size=batch, shuffle=False, drop_last=True,
                                 num_workers=workers, persistent_workers=workers > 0,
                                 pin_memory=self.device.type == "cuda")

    def step(self, batch):
        x0, x1 = (v.to(self.device, non_blocking=True).contiguous(
            memory_format=torch.channels_last) for v in batch)
        with self.autocast:
            loss = self.criterion(self.model(x0), self.model(x1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class Sslfast(_Training):
    def start(self):
        from sslfast.methods import SimCLR
        from sslfast.pretrain.data import make_loader

        name, batch, crop = self.case[:3]
        gpu = self.device.type == "cuda"
        torch.manual_seed(0)
        backbone = _backbone(name)
        self.method = SimCLR(backbone, image_size=crop, temperature=TEMPERATURE,
                             augment_dtype=torch.bfloat16 if gpu else torch.float32,
                             channels_last=True).to(self.device)
        self.method.to(memory_format=torch.channels_last)
        self.optimizer = self._optimizer(self.method.parameters())
        self.generator = torch.Generator(device=self.device).manual_seed(0)
        self.loader = make_loader(_Cycle(_encoded_images(self.case)), batch, shuffle=False,
                                  drop_last=True, num_workers=num_workers())

    def step(self, batch):
        from sslfast.pretrain.train import train_step

        train_step(self.method, self.method, self.optimizer, batch[0], self.device,
                   self.generator, self.autocast)


def providers(case, device):
    """name -> a training loop whose every call runs one step (built on first call)."""
    out = {}
    try:
        import lightly.loss  # noqa: F401
        import lightly.models.modules  # noqa: F401

        out["torchvision_lightly"] = TorchvisionLightly(case, device)
    except ImportError:
        print("  lightly not installed: skipped")
    out["sslfast"] = Sslfast(case, device)
    return out


# ---- timing -------------------------------------------------------------------------------


def measure(training, device, warmup, steps, chunk):
    """The figures of one provider (see the module's docstring); closes it."""
    from sslfast._memory import peak_memory

    batch = training.case[1]
    out = {}

    def timed():
        for _ in range(warmup):  # starts the workers, autotunes, fills the loader's queue
            training()
        harness.sync(device)
        training.wait_s = 0.0
        per_step, done = [], 0
        start = time.perf_counter()
        while done < steps:
            n = min(chunk, steps - done)
            t0 = time.perf_counter()
            for _ in range(n):
                training()
            harness.sync(device)
            per_step.append((time.perf_counter() - t0) * 1e3 / n)
            done += n
        seconds = time.perf_counter() - start
        out["images_per_s"] = steps * batch / seconds
        out["median_ms"], out["p20_ms"], out["p80_ms"] = harness.summary(per_step)
        out["loader_wait_share"] = training.wait_s / seconds
        out["workers_uss_bytes"] = training.workers_uss_bytes()

    try:
        if device.type == "cuda":  # the allocator's peak from the build on
            out["peak_mem_bytes"] = peak_memory(timed, device)[1]
        else:  # apart from the timing (peak_memory slows the CPU's allocations down)
            timed()
            step_peak = peak_memory(training.step_only, device)[1]
            out["peak_mem_bytes"] = (None if step_peak is None
                                     else training.state_bytes() + step_peak)
        n_only = max(1, steps // 2)
        t0 = time.perf_counter()
        for _ in range(n_only):
            training.step_only()
        harness.sync(device)
        out["step_images_per_s"] = n_only * batch / (time.perf_counter() - t0)
    finally:
        training.close()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["data_bound_share"] = max(0.0, 1 - out["images_per_s"] / out["step_images_per_s"])
    out["bound"] = "data" if out["data_bound_share"] > 0.1 else "compute"
    return out


COLUMNS = ["provider", "images_per_s", "median_ms", "p20_ms", "p80_ms", "step_images_per_s",
           "data_bound_share", "loader_wait_share", "peak_mem_bytes", "workers_uss_bytes",
           "tflops", "pct_of_peak", "speedup_vs_reference", "oom"]


def run(device, quick=False, write=True, progress=None, ceil=None, select=None):
    env, ceil, peak_key = harness.matmul_bench_start(device, quick, OP, ceil)
    warmup, steps, chunk = schedule(device, quick)
    workers = num_workers()
    records = []
    for case in harness.selected(cases(device, quick), select):
        name, batch, crop, width, height, n_images = case
        if progress:
            progress(f"{OP}: simclr {name} B={batch} {crop}px")
        encoded = jpegs(n_images, width, height)
        mean_jpeg = sum(e.numel() for e in encoded) / len(encoded)
        flops = model_flops(case)
        measured = {}
        for pname, training in providers(case, device).items():
            try:
                measured[pname] = measure(training, device, warmup, steps, chunk)
            except torch.cuda.OutOfMemoryError:
                measured[pname] = {"oom": True}
                torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001 - e.g. a loader worker killed: recorded
                print(f"  {pname} failed: {type(exc).__name__}: {exc}")
                measured[pname] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        dtype = "bfloat16" if device.type == "cuda" else "float32"
        shape = (f"simclr {name}: B={batch} 2x{crop}px from {n_images} JPEGs "
                 f"~{width}x{height}")
        rows = []
        for pname, m in measured.items():
            r = {**env, "op": OP, "provider": pname, "model": f"simclr_{name}", "shape": shape,
                 "dtype": dtype, "rows": batch, "views": 2, "crop": crop,
                 "source": f"{width}x{height}", "images": n_images, "mean_jpeg_bytes": mean_jpeg,
                 "num_workers": workers, "warmup_steps": warmup, "steps": steps,
                 "chunk_steps": chunk, "quick": quick,
                 "flops": flops, "ceilings": ceil, "ceiling_tflops": ceil[peak_key], **m}
            if "median_ms" in m:
                r["tflops"] = flops * m["images_per_s"] / batch / 1e12
                r["pct_of_peak"] = 100 * r["tflops"] / ceil[peak_key]
            rows.append(r)
        harness.add_speedups(rows, "torchvision_lightly", key="images_per_s")
        print(f"\n  {shape}, {dtype}, {workers} loader workers, {steps} timed steps")
        harness.print_table(rows, COLUMNS)
        for r in rows:
            if "bound" in r:
                print(f"  {r['provider']}: {r['bound']}-bound ({100 * r['data_bound_share']:.0f} %"
                      f" of the time lost to the input pipeline)")
        records += rows
    return harness.finish(OP, records, write)


# ---- --check ------------------------------------------------------------------------------


def _check_case(case, device):
    """The sslfast step's loss and gradients against the float64 NT-Xent of the
    same encoder on the same views, and lightly's loss (the baseline's) on them."""
    from sslfast.bench.check import TOLERANCE, _rel_error, _row
    from sslfast.methods import SimCLR
    from sslfast.pretrain.data import decode_images, stack_if_same_size
    from sslfast.reference import ntxent_reference

    name, batch, crop = case[:3]
    torch.manual_seed(0)
    method = SimCLR(_backbone(name), image_size=crop, temperature=TEMPERATURE).to(device)
    data = _encoded_images(case)
    encoded = [data[i][0] for i in range(batch)]
    images = stack_if_same_size(decode_images(encoded, device))
    views = method.augment(images, torch.Generator(device=device).manual_seed(0))
    if [tuple(v.shape) for v in views] != [(batch, 3, crop, crop)] * 2:
        raise AssertionError(f"views of shapes {[tuple(v.shape) for v in views]}")
    params = [p for p in method.parameters() if p.requires_grad]
    with _ieee_convolutions(device):
        loss = method(views)  # BatchNorm in training mode: batch statistics, both passes alike
        grads = torch.autograd.grad(loss, params)
        z0, z1 = method.encoder(torch.cat(views)).double().chunk(2)
        expected = ntxent_reference(z0, z1, TEMPERATURE)
        ref_grads = torch.autograd.grad(expected, params, retain_graph=True)
    errors = [_rel_error(loss, expected)] + [_rel_error(g, r) for g, r in zip(grads, ref_grads)]
    try:
        from lightly.loss import NTXentLoss

        errors.append(_rel_error(NTXentLoss(TEMPERATURE)(z0, z1), expected))
    except ImportError:
        pass
    label = f"simclr {name} B={batch} {crop}px: loss, grads"
    # 10 x float32's: the two backward passes differ in the last bits of the loss's
    # gradient, and the encoder's sums (cuDNN's choice of algorithm) add their own
    return _row("pretrain step", label, errors, 10 * TOLERANCE[torch.float32])


def _ieee_convolutions(device):
    """cuDNN's fp32 convolutions in IEEE fp32 inside the block (they default to TF32,
    whose 10-bit rounding of the two passes' gradients would be the check's error)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return harness.fp32_precision("ieee", torch.backends.cudnn.conv)


def check(device, quick=False):
    """``--check`` rows: one step from JPEG bytes (decode, augment, encoder,
    NT-Xent, gradients) against the float64 reference, at the quick case (and the
    device's CPU-sized case unless quick)."""
    from sslfast.bench.check import _guard

    shapes = cases(device, True) + ([] if quick else cases(torch.device("cpu"), False))
    return [_guard("pretrain step", f"simclr {c[0]} B={c[1]} {c[2]}px",
                   functools.partial(_check_case, c, device)) for c in shapes]


def main(argv=None):
    harness.cli(run, __doc__, argv)
