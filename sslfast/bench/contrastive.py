"""Contrastive losses, forward + backward: sslfast against the materialized
reference (in the same dtype), lightly's NTXentLoss, and Inf-CL (GPU, where
installed). On the GPU, NT-Xent and CLIP also run as ``sslfast_deterministic``
(under torch.use_deterministic_algorithms: the atomic-free one-direction
kernels instead of the tile-pair ones), and fp32 cases as ``sslfast_tf32``
(torch's fp32 matmul precision "tf32", which the kernels follow: TF32 tensor-core
dots instead of IEEE FMA ones).

Cases (GPU; on the CPU the sizes are scaled down):
  ntxent    2N in {4096, 16384, 65536, 262144}, D in {128, 256}
  moco      InfoNCE against a queue: N in {256, 4096}, K = 65536, D = 128
  clip      N in {16384, 65536}, D = 512
FLOPs counted: 6 * R * C * D for R rows by C columns of logits (CLIP: one
N x N matrix). The achieved TFLOP/s is compared with the matmul rate measured
in the same run (bf16 on GPU, fp32 on CPU). Out-of-memory is recorded, not fatal.

    python -m sslfast.bench --ops contrastive [--quick] [--device cpu|cuda] [--no-write]
    python benchmarks/bench_contrastive.py [--quick] [--device cpu|cuda] [--no-write]
"""

import torch
import torch.nn.functional as F

from sslfast import functional
from sslfast.bench import harness
from sslfast.reference import clip_reference, info_nce_reference, ntxent_reference

OP = "contrastive"
# Every provider the benchmark may run (those not installed are skipped with a note).
PROVIDER_NAMES = ["reference", "lightly", "inf_cl", "sslfast", "sslfast_deterministic",
                  "sslfast_tf32"]

# (kind, rows per view N, D, queue K); NT-Xent has 2N rows and columns.
GPU_CASES = (
    [("ntxent", n2 // 2, d, 0) for n2 in (4096, 16384, 65536, 262144) for d in (128, 256)]
    + [("moco", n, 128, 65536) for n in (256, 4096)]
    + [("clip", n, 512, 0) for n in (16384, 65536)]
)
CPU_CASES = [("ntxent", 2048, 128, 0), ("ntxent", 8192, 128, 0), ("moco", 256, 128, 65536),
             ("clip", 4096, 512, 0)]
QUICK_CASES = [("ntxent", 1024, 128, 0), ("moco", 128, 128, 8192), ("clip", 1024, 256, 0)]
# The dense providers (they build the logit matrix) would need more than this many
# logits: skipped, not run into OOM.
DENSE_PROVIDERS = ("reference", "lightly")
DENSE_LIMIT = {"cuda": 65536 * 65536, "cpu": 16384 * 16384}


def _flops(kind, rows, d, k):
    if kind == "ntxent":
        r, c = 2 * rows, 2 * rows
    else:
        r, c = (rows, k + 1) if kind == "moco" else (rows, rows)
    return 6 * r * c * d, r * c


def cases(device, quick):
    """(kind, rows N, D, queue K, dtype) of this device's sweep."""
    shapes = QUICK_CASES if quick else (GPU_CASES if device.type == "cuda" else CPU_CASES)
    dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    return [(*shape, dtype) for shape in shapes for dtype in dtypes]


def providers(case, device):
    """name -> a callable running one forward + backward of the case."""
    kind, rows, d, k, dtype = case
    g = torch.Generator(device="cpu").manual_seed(0)

    def leaf(n):
        return torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()

    a, b = leaf(rows), leaf(rows)
    out = {}
    if kind == "ntxent":
        out["reference"] = lambda: ntxent_reference(a, b, 0.5)
        try:
            from lightly.loss import NTXentLoss

            lightly_loss = NTXentLoss(0.5)
            out["lightly"] = lambda: lightly_loss(a, b)
        except ImportError:
            print("  lightly not installed: skipped")
        out["sslfast"] = lambda: functional.ntxent_loss(a, b, 0.5)
    elif kind == "moco":
        b.requires_grad_(False)  # keys from the momentum encoder
        queue = F.normalize(torch.randn(k, d, generator=g), dim=1).to(device=device, dtype=dtype)
        out["reference"] = lambda: info_nce_reference(a, b, queue, 0.2)
        out["sslfast"] = lambda: functional.info_nce_loss(a, b, queue, 0.2)
    else:
        scale = torch.tensor(14.3, device=device, requires_grad=True)
        out["reference"] = lambda: clip_reference(a, b, scale)
        if device.type == "cuda":
            try:
                from inf_cl import cal_flash_loss

                labels = torch.arange(rows, device=device)

                def inf_cl():
                    # Inf-CL's one-GPU loss (its cal_inf_loss passes the scale through a
                    # GradientGather whose backward all-reduces: it needs a process group).
                    x, y = F.normalize(a, dim=1), F.normalize(b, dim=1)
                    return (cal_flash_loss(x, y, labels=labels, scale=scale).mean()
                            + cal_flash_loss(y, x, labels=labels, scale=scale).mean()) / 2

                out["inf_cl"] = inf_cl
            except Exception as exc:  # noqa: BLE001 - not installed, or not importable here
                print(f"  inf_cl unavailable ({type(exc).__name__}: {exc}): skipped")
        out["sslfast"] = lambda: functional.clip_loss(a, b, scale)
    steps = harness.backward_steps(out, [a, b])
    if device.type == "cuda" and kind != "moco":
        steps["sslfast_deterministic"] = _deterministic(steps["sslfast"])
    if device.type == "cuda" and dtype == torch.float32 and hasattr(torch.backends.cuda.matmul,
                                                                     "fp32_precision"):
        steps["sslfast_tf32"] = _tf32(steps["sslfast"])
    return steps


def _tf32(step):
    """step with torch's fp32 matmul precision "tf32" (restored after)."""

    def run():
        with harness.fp32_precision("tf32"):
            step()

    return run


def _deterministic(step):
    """step under torch.use_deterministic_algorithms: NT-Xent and CLIP then run the
    atomic-free one-direction kernels instead of the tile-pair ones."""

    def run():
        prev = torch.are_deterministic_algorithms_enabled()
        prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            step()
        finally:
            torch.use_deterministic_algorithms(prev, warn_only=prev_warn)

    return run


def run(device, quick=False, write=True, progress=None, ceil=None, select=None):
    env, ceil, peak_key = harness.matmul_bench_start(device, quick, OP, ceil)
    records = []
    for case in harness.selected(cases(device, quick), select):
        kind, rows, d, k, dtype = case
        if progress:
            progress(f"{OP}: {kind} N={rows} D={d} {str(dtype)[6:]}")
        flops, n_logits = _flops(kind, rows, d, k)
        provs = providers(case, device)
        if n_logits > DENSE_LIMIT[device.type]:
            for name in [p for p in provs if p in DENSE_PROVIDERS]:
                print(f"  {kind} N={rows}: {name} skipped ({n_logits} dense logits)")
                del provs[name]
        measured = harness.trial_runs(provs)
        measured.update(harness.measure_all(provs, device, quick, min_runs=3))
        size = f"2N={2 * rows}" if kind == "ntxent" else f"N={rows}"
        shape = f"{kind}: {size} D={d}" + (f" K={k}" if k else "")
        fields = {"op": OP, "model": kind, "shape": shape, "dtype": str(dtype)[6:],
                  "rows": rows, "dim": d, "queue": k, "quick": quick}
        records += harness.tflops_case(env, measured, fields, flops, ceil, peak_key,
                                       f"{shape}, {dtype}")
        del provs
    return harness.finish(OP, records, write)


def main(argv=None):
    harness.cli(run, __doc__, argv)

