"""DINO loss, forward + backward + center update: sslfast against the definition
(per pair, in the inputs' dtype) and lightly's DINOLoss.

Providers (each: the loss of T = 2 teacher crops against S = 10 student crops, the
center's EMA update, the backward to the student crops):
  reference  sslfast.reference.dino_reference (per-pair softmax / log_softmax), then
             the center update as lightly's
  lightly    lightly.loss.DINOLoss (bf16 inputs under autocast: it mixes its float32
             center with the teacher)
  sslfast    sslfast.DINOLoss on the same lists of crops (the kernels get them stacked)
  sslfast_groups
             sslfast.DINOLoss on a (T, N, K) teacher tensor and two student groups,
             (T, N, K) global and (S - T, N, K) local crops, as sslfast.methods.DINO
             passes them (one backbone pass per resolution): read where they are

Cases: K = 65536 (DINO's output dimension), N in {64, 256} rows per crop, bf16 and
fp32 on the GPU; smaller on the CPU (fp32). Bytes counted: the teacher and student
crops read once and the student gradient written once, (T + 2 S) N K elements; the
achieved GB/s is compared with the device's memory bandwidth measured in the same run.

    python -m sslfast.bench --ops dino [--quick] [--device cpu|cuda] [--no-write]
    python benchmarks/bench_dino.py [--quick] [--device cpu|cuda] [--no-write]
"""


import torch

import sslfast
from sslfast.bench import harness
from sslfast.reference.dino import dino_reference

OP = "dino"
# Every provider the benchmark may run (those not installed are skipped with a note).
PROVIDER_NAMES = ["reference", "lightly", "sslfast", "sslfast_groups"]

T, S = 2, 10  # 2 global crops (teacher and student) + 8 local crops (student)
TEACHER_TEMP, STUDENT_TEMP, MOMENTUM = 0.04, 0.1, 0.9
GPU_CASES = [(64, 65536), (256, 65536)]
CPU_CASES = [(16, 65536), (64, 16384)]
QUICK_CASES = [(16, 4096)]


def cases(device, quick):
    """(rows per crop N, output dimension K, dtype) of this device's sweep."""
    shapes = QUICK_CASES if quick else (GPU_CASES if device.type == "cuda" else CPU_CASES)
    dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    return [(*shape, dtype) for shape in shapes for dtype in dtypes]


def providers(case, device):
    """name -> a callable running one step (loss, center update, backward)."""
    n, k, dtype = case
    g = torch.Generator(device="cpu").manual_seed(0)

    def crops(count, grad):
        return [torch.randn(n, k, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
                for _ in range(count)]

    teacher, student = crops(T, False), crops(S, True)
    out = {}
    center = torch.zeros(1, 1, k, device=device)

    def reference():
        loss = dino_reference(teacher, student, center, TEACHER_TEMP, STUDENT_TEMP)
        with torch.no_grad():
            batch = torch.stack(teacher).float().mean(dim=(0, 1), keepdim=True)
            center.mul_(MOMENTUM).add_(batch, alpha=1 - MOMENTUM)
        return loss

    out["reference"] = reference
    try:
        from lightly.loss import DINOLoss

        lightly_loss = DINOLoss(k, teacher_temp=TEACHER_TEMP, student_temp=STUDENT_TEMP,
                                center_momentum=MOMENTUM).to(device)
        cast = harness.autocast_to(device, dtype)

        def lightly_step():
            with cast:
                return lightly_loss(teacher, student)

        out["lightly"] = lightly_step
    except ImportError:
        print("  lightly not installed: skipped")
    def ours():
        return sslfast.DINOLoss(k, teacher_temp=TEACHER_TEMP, student_temp=STUDENT_TEMP,
                                center_momentum=MOMENTUM).to(device)

    lists = ours()
    out["sslfast"] = lambda: lists(teacher, student)
    teacher_all = torch.stack(teacher)
    groups = [torch.stack([x.detach() for x in part]).requires_grad_()
              for part in (student[:T], student[T:])]
    grouped = ours()
    out["sslfast_groups"] = lambda: grouped(teacher_all, groups)
    return harness.backward_steps(out, student + groups)


def run(device, quick=False, write=True, progress=None, ceil=None, select=None):
    env, ceil = harness.bandwidth_bench_start(device, quick, "DINO loss", ceil)
    records = []
    for case in harness.selected(cases(device, quick), select):
        n, k, dtype = case
        name = f"dino T={T} S={S} N={n} K={k}"
        if progress:
            progress(f"{OP}: N={n} K={k} {str(dtype)[6:]}")
        provs = providers(case, device)
        measured = harness.trial_runs(provs)
        measured.update(harness.measure_all(provs, device, quick, min_runs=3))
        n_bytes = (T + 2 * S) * n * k * torch.finfo(dtype).bits // 8
        rows = []
        for pname, m in measured.items():
            r = {**env, "op": OP, "provider": pname, "model": name, "shape": name,
                 "dtype": str(dtype)[6:], "rows": n, "dim": k, "teacher_crops": T,
                 "student_crops": S, "bytes": n_bytes, "ceiling_gbps": ceil["mem_gbps"],
                 "ceilings": ceil, "quick": quick, **m}
            if "median_ms" in m:
                r["gbps"] = n_bytes / m["median_ms"] / 1e6
                r["pct_of_peak"] = 100 * r["gbps"] / ceil["mem_gbps"]
            rows.append(r)
        harness.add_speedups(rows)
        print(f"\n  {name}, {dtype}")
        harness.print_table(rows, ["provider", "median_ms", "p20_ms", "p80_ms", "peak_mem_bytes",
                                   "gbps", "pct_of_peak", "speedup_vs_reference",
                                   "speedup_vs_best_other", "mem_vs_reference", "oom"])
        records += rows
        del provs
    return harness.finish(OP, records, write)


def main(argv=None):
    harness.cli(run, __doc__, argv)
