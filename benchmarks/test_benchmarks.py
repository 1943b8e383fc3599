"""Every op benchmark under pytest-benchmark, for those who prefer it:

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json]

One test per (op, case, provider); the quick cases by default, the full sweep
with SSLFAST_BENCH_FULL=1; on the GPU when there is one. Providers that are not
installed (or do not apply to a case) are skipped. ``python -m sslfast.bench``
is the suite's own runner (ceilings, JSON lines, reports); this is the same
work timed by pytest-benchmark.
"""

import importlib
import os

import pytest
import torch

from sslfast.bench import OPS

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("SSLFAST_BENCH_FULL", "0") in ("", "0")


def _params():
    out = []
    for op, path in OPS.items():
        module = importlib.import_module(path)
        for case in module.cases(DEVICE, QUICK):
            case_id = "-".join(str(x).replace("torch.", "") for x in case)
            for provider in module.PROVIDER_NAMES:
                out.append(pytest.param(op, case, provider, id=f"{op}-{case_id}-{provider}"))
    return out


_cached = {}


def _providers(op, case):
    """The providers of one case, built once for its consecutive tests."""
    key = (op, case)
    if key not in _cached:
        _cached.clear()
        _cached[key] = importlib.import_module(OPS[op]).providers(case, DEVICE)
    return _cached[key]


@pytest.mark.parametrize("op, case, provider", _params())
def test_benchmark(benchmark, op, case, provider):
    fns = _providers(op, case)
    if provider not in fns:
        pytest.skip(f"{provider} not installed or not applicable to this case")
    fn = fns[provider]
    if DEVICE.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    timed()  # warm-up (compilation, autotuning, allocation)
    benchmark(timed)
