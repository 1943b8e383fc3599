"""The MoCo step core, forward + backward: the loss of N queries against
[their keys | a queue of K negatives], then the keys written into the queue.

Providers:
  reference  MoCo's own code path: logits concatenated from two einsums (the
             queue cloned, as MoCo does), cross-entropy, and the enqueue as a
             slice assignment at a pointer read on the host (one sync per step)
  lightly    NTXentLoss(memory_bank_size=(K, D)) (its bank clone and update);
             bf16 inputs run under autocast (its bank is float32)
  sslfast    info_nce_loss against MemoryBank.negatives() (no copy), then
             MemoryBank.enqueue (fused, pointer on the device), then backward

Cases (GPU): N in {256, 4096}, K = 65536, D = 128, bf16 and fp32; on the CPU
fp32 only (its bf16 matmul is several times slower than fp32). FLOPs counted:
6 * N * (K + 1) * D. On a GPU every provider's host synchronizations per step
are counted (torch.cuda.set_sync_debug_mode) and recorded as host_syncs.

    python -m sslfast.bench --ops queue [--quick] [--device cpu|cuda] [--no-write]
    python benchmarks/bench_queue.py [--quick] [--device cpu|cuda] [--no-write]
"""

import warnings

import torch
import torch.nn.functional as F

from sslfast import functional
from sslfast.bench import harness
from sslfast.modules.memory_bank import MemoryBank

OP = "queue"
# Every provider the benchmark may run (those not installed are skipped with a note).
PROVIDER_NAMES = ["reference", "lightly", "sslfast"]

CASES = [(256, 65536, 128), (4096, 65536, 128)]
QUICK_CASES = [(128, 8192, 128)]
TEMPERATURE = 0.2


def _reference_step(a, b, queue, ptr):
    """MoCo (github.com/facebookresearch/moco, builder.py), queue stored (K, D)."""
    q = F.normalize(a, dim=1)
    with torch.no_grad():
        k = F.normalize(b, dim=1)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,kc->nk", q, queue.clone().detach())
    logits = torch.cat([l_pos, l_neg], dim=1) / TEMPERATURE
    loss = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=a.device))
    p = int(ptr)  # host-side pointer
    queue[p:p + k.shape[0]] = k  # K is a multiple of N, as MoCo asserts
    ptr[0] = (p + k.shape[0]) % queue.shape[0]
    return loss


def cases(device, quick):
    """(N, K, D, dtype) of this device's sweep."""
    dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    return [(*shape, dtype) for shape in (QUICK_CASES if quick else CASES) for dtype in dtypes]


def providers(case, device):
    """name -> a callable running one MoCo step core (loss, enqueue, backward)."""
    n, k, d, dtype = case
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    b = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)  # momentum-encoder keys
    init = F.normalize(torch.randn(k, d, generator=g), dim=1)
    out = {}

    ref_queue = init.to(device=device, dtype=dtype)
    ref_ptr = torch.zeros(1, dtype=torch.long, device=device)
    out["reference"] = lambda: _reference_step(a, b, ref_queue, ref_ptr)

    try:
        from lightly.loss import NTXentLoss

        lightly_loss = NTXentLoss(TEMPERATURE, memory_bank_size=(k, d)).to(device)
        lightly_loss.memory_bank.bank.copy_(init)
        cast = harness.autocast_to(device, dtype)

        def lightly_step():
            with cast:
                return lightly_loss(a, b)

        out["lightly"] = lightly_step
    except ImportError:
        print("  lightly not installed: skipped")

    bank = MemoryBank(k, d, dtype=dtype, device=device)
    bank.queue.copy_(init)

    def sslfast_step():
        loss = functional.info_nce_loss(a, b, bank.negatives(), TEMPERATURE)
        bank.enqueue(b)
        return loss

    out["sslfast"] = sslfast_step
    return harness.backward_steps(out, [a])


def count_host_syncs(fn):
    """Host synchronizations one call makes (CUDA), from torch's sync debug mode."""
    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def run(device, quick=False, write=True, progress=None, ceil=None, select=None):
    env, ceil, peak_key = harness.matmul_bench_start(device, quick, OP, ceil)
    records = []
    for case in harness.selected(cases(device, quick), select):
        n, k, d, dtype = case
        if progress:
            progress(f"{OP}: N={n} K={k} D={d} {str(dtype)[6:]}")
        flops = 6 * n * (k + 1) * d
        provs = providers(case, device)
        measured = harness.trial_runs(provs)
        syncs = ({name: count_host_syncs(fn) for name, fn in provs.items()}
                 if device.type == "cuda" else {})
        measured.update(harness.measure_all(provs, device, quick, min_runs=3))
        for name in measured:
            measured[name]["host_syncs"] = syncs.get(name)
        shape = f"moco step: N={n} K={k} D={d}"
        fields = {"op": OP, "model": "moco_step", "shape": shape, "dtype": str(dtype)[6:],
                  "rows": n, "queue": k, "dim": d, "quick": quick}
        records += harness.tflops_case(env, measured, fields, flops, ceil, peak_key,
                                       f"{shape}, {dtype}", extra_columns=["host_syncs"])
        del provs
    return harness.finish(OP, records, write)


def main(argv=None):
    harness.cli(run, __doc__, argv)

