"""EMA (momentum) update: sslfast against what users run today.

Providers, each updating an EMA copy of a timm model in place:
  loop          the definition in place: t.mul_(m).add_(s, alpha=1-m) per tensor
  lerp_loop     t.lerp_(s, 1-m) per tensor (source cast first when dtypes differ)
  foreach_lerp  torch._foreach_lerp_ over the lists (sources cast when dtypes differ)
  lightly       lightly.models.utils.update_momentum (parameters only)
  timm          timm.utils.ModelEmaV3.apply_update_ (parameters and buffers)
  sslfast       sslfast.functional.ema_ over the lists
  sslfast.ModelEMA  sslfast.ModelEMA.update (parameters and buffers)

Bytes moved per element: 12 (fp32 model and shadow), 10 (bf16 model, fp32
shadow). Achieved GB/s is compared with the device's memory bandwidth measured
in the same run: the better of a device-to-device copy and an in-place add.

    python -m sslfast.bench --ops ema [--quick] [--device cpu|cuda] [--no-write]
    python benchmarks/bench_ema.py [--quick] [--device cpu|cuda] [--no-write] [--models ...]
"""

import copy

import torch

import sslfast
from sslfast import functional
from sslfast.bench import harness

OP = "ema"
# Every provider the benchmark may run (those not installed are skipped with a note).
PROVIDER_NAMES = ["loop", "lerp_loop", "foreach_lerp", "lightly", "timm", "sslfast",
                  "sslfast.ModelEMA"]

DECAY = 0.999
MODELS = {"resnet50": "resnet50", "vit_large_patch16_224": "vit_large_patch16_224"}


def _float_state(module):
    """Parameters and floating-point buffers, in state_dict order."""
    return [v for v in module.state_dict().values() if v.is_floating_point()]


def cases(device, quick, models=None):
    """(model name, dtype pair) of the sweep (timm models need no download)."""
    models = models or (["resnet50"] if quick else list(MODELS))
    return [(m, pair) for m in models for pair in ("fp32<-fp32", "fp32<-bf16")]


def providers(case, device, model=None):
    """name -> a callable running one EMA update of the case (model: the timm
    model, created when not given)."""
    provs = _providers(model if model is not None else _model(case[0]), case[1], device)[0]
    return {name: fn for name, (fn, _note) in provs.items()}


def _model(name):
    import timm

    return timm.create_model(MODELS[name], pretrained=False)


def _providers(model, case, device):
    """(name -> (setup-free callable, note), numel, tensors). The shadow is fp32;
    the model fp32 or bf16."""
    model_dtype = torch.float32 if case == "fp32<-fp32" else torch.bfloat16
    model = model.to(device=device, dtype=model_dtype)
    shadow = copy.deepcopy(model).float()
    ts, ss = _float_state(shadow), _float_state(model)
    same = model_dtype == torch.float32
    w = 1.0 - DECAY
    out = {}

    def loop():
        for t, s in zip(ts, ss):
            t.mul_(DECAY).add_(s, alpha=w)

    out["loop"] = (loop, "reference: mul_/add_ per tensor")

    def lerp_loop():
        for t, s in zip(ts, ss):
            t.lerp_(s if same else s.float(), w)

    out["lerp_loop"] = (lerp_loop, "lerp_ per tensor")

    def foreach_lerp():
        torch._foreach_lerp_(ts, ss if same else [s.float() for s in ss], w)

    out["foreach_lerp"] = (foreach_lerp, "torch._foreach_lerp_")

    try:
        from lightly.models.utils import update_momentum

        out["lightly"] = (lambda: update_momentum(model, shadow, DECAY), "parameters only")
    except ImportError:
        print("  lightly not installed: skipped")
    try:
        from timm.utils.model_ema import ModelEmaV3

        timm_ema = ModelEmaV3(model, decay=DECAY, dtype=torch.float32)
        out["timm"] = (lambda: timm_ema.apply_update_(model, DECAY), "ModelEmaV3")
    except Exception as exc:  # noqa: BLE001 - not installed, or a timm without these arguments
        print(f"  timm's ModelEmaV3 unavailable ({type(exc).__name__}: {exc}): skipped")
    out["sslfast"] = (lambda: functional.ema_(ts, ss, DECAY), "functional.ema_")
    ours = sslfast.ModelEMA(model, decay=DECAY, shadow_dtype=torch.float32)
    out["sslfast.ModelEMA"] = (lambda: ours.update(model), "ModelEMA.update")
    n = sum(t.numel() for t in ts)
    return out, n, len(ts)


def run(device, quick=False, write=True, progress=None, ceil=None, models=None,
        select=None):
    env, ceil = harness.bandwidth_bench_start(device, quick, "EMA", ceil)
    records = []
    bases = {}
    for name, case in harness.selected(cases(device, quick, models), select):
        if progress:
            progress(f"{OP}: {name} {case}")
        if name not in bases:
            bases[name] = _model(name)
        provs, numel, n_tensors = _providers(copy.deepcopy(bases[name]), case, device)
        bytes_per = 12 if case == "fp32<-fp32" else 10
        rows = []
        measured = harness.measure_all({k: fn for k, (fn, _) in provs.items()}, device, quick)
        for pname, (_fn, note) in provs.items():
            m = measured[pname]
            gbps = numel * bytes_per / m["median_ms"] / 1e6
            rows.append({
                **env, "op": OP, "provider": pname, "note": note, "model": name,
                "shape": f"{name}: {numel} elements in {n_tensors} tensors",
                "numel": numel, "n_tensors": n_tensors, "dtype": case, **m,
                "bytes": numel * bytes_per, "gbps": gbps,
                "ceiling_gbps": ceil["mem_gbps"],
                "pct_of_peak": 100 * gbps / ceil["mem_gbps"], "ceilings": ceil,
                "quick": quick,
            })
        harness.add_speedups(rows, reference="loop")
        print(f"\n  {name}, {case}")
        harness.print_table(rows, ["provider", "median_ms", "p20_ms", "p80_ms",
                                   "peak_mem_bytes", "gbps", "pct_of_peak",
                                   "speedup_vs_reference", "speedup_vs_best_other"])
        records += rows
        del provs
    return harness.finish(OP, records, write)


def main(argv=None):
    p = harness.parser(__doc__)
    p.add_argument("--models", default=None, help="comma-separated: " + ",".join(MODELS))
    a = p.parse_args(argv)
    harness.use_results(a.results)
    models = a.models.split(",") if a.models else None
    run(torch.device(a.device), a.quick, not a.no_write, models=models)

