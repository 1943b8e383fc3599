"""The package foundation: imports, backend choice, the benchmark harness and report."""

import json
import os
import sys

import pytest
import torch

import sslfast
from sslfast._backend import resolve_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_public_api():
    for name in ("ModelEMA", "update_momentum", "cosine_schedule", "functional"):
        assert hasattr(sslfast, name)
    assert callable(sslfast.functional.ema_)
    assert isinstance(sslfast.__version__, str)


def test_extension_is_built_here():
    """The dev/CI set-up builds the extension; a silent fallback would hide it."""
    if os.environ.get("SSLFAST_NO_EXTENSION"):
        pytest.skip("extension disabled")
    assert sslfast.has_cpu_kernels()
    assert hasattr(torch.ops.sslfast, "ema_")


def test_resolve_backend(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    impl = ("cuda", "cpu", "reference")
    monkeypatch.delenv("SSLFAST_BACKEND", raising=False)
    assert resolve_backend("auto", cpu, "op", impl) == "cpu"
    assert resolve_backend("auto", cuda, "op", impl) == "cuda"
    assert resolve_backend("auto", cuda, "op", ("triton", "cpu"), gpu_default="triton") == "triton"
    assert resolve_backend("reference", cuda, "op", impl) == "reference"
    monkeypatch.setenv("SSLFAST_BACKEND", "reference")
    assert resolve_backend("auto", cpu, "op", impl) == "reference"
    assert resolve_backend("cpu", cpu, "op", impl) == "cpu"  # the argument wins
    with pytest.raises(ValueError, match="backend 'cpu' needs CPU tensors"):
        resolve_backend("cpu", cuda, "op", impl)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", cpu, "op", ("triton",)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("triton", cpu, "op", ("triton",))


@pytest.fixture
def bench_modules():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import harness
    import report

    yield harness, report
    sys.path.remove(os.path.join(ROOT, "benchmarks"))


def test_harness_records_and_report(bench_modules, tmp_path, monkeypatch):
    harness, report = bench_modules
    monkeypatch.setattr(harness, "RESULTS", str(tmp_path))
    dev = torch.device("cpu")
    env = harness.environment(dev)
    for key in ("device", "torch", "triton", "cuda", "commit", "date", "python"):
        assert key in env
    x = torch.randn(1 << 16)
    m = harness.measure(lambda: x.mul_(1.0), dev, quick=True)
    assert m["p20_ms"] <= m["median_ms"] <= m["p80_ms"]
    ceil = harness.ceilings(dev, quick=True)
    assert ceil["mem_gbps"] > 0 and ceil["matmul_float32_tflops"] > 0
    recs = []
    for provider, ms in (("loop", 2.0), ("sslfast", 1.0)):
        recs.append({**env, "op": "ema", "provider": provider, "model": "m", "dtype": "fp32<-fp32",
                     "median_ms": ms, "gbps": 10.0 / ms, "pct_of_peak": 50.0 / ms,
                     "ceiling_gbps": 20.0, "speedup_vs_reference": 2.0 / ms,
                     "speedup_vs_best_other": 2.0 / ms, "quick": False})
    sample = [{"provider": "reference", "median_ms": 4.0, "peak_mem_bytes": 100},
              {"provider": "lightly", "median_ms": 2.0, "peak_mem_bytes": 50},
              {"provider": "big", "oom": True},
              {"provider": "sslfast", "median_ms": 1.0, "peak_mem_bytes": 10}]
    harness.add_speedups(sample)
    assert sample[3]["speedup_vs_reference"] == 4.0 and sample[3]["speedup_vs_best_other"] == 2.0
    assert sample[3]["mem_vs_reference"] == 0.1 and "speedup_vs_reference" not in sample[2]
    path = harness.write_records("ema", recs)
    harness.write_records("ema", recs)  # appends, never overwrites
    lines = [json.loads(line) for line in open(path)]
    assert len(lines) == 4
    text = report.render(report.load(str(tmp_path)))
    assert "| m | fp32&lt;-fp32 | 2 | 1 | 10 | 50% | 2.00x | 2.00x |" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\nend\n")
    report.update_readme(text, str(readme))
    new = readme.read_text()
    assert "old" not in new and "2.00x" in new and new.endswith("end\n")


def test_benchmarks_run_quick(tmp_path):
    """Every benchmark runs end to end (--quick, nothing written) and prints its table."""
    import subprocess

    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--no-write",
         "--device", "cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for op in ("ema", "contrastive"):
        assert f"==== {op} ====" in out.stdout
    assert out.stdout.count("sslfast ") >= 5, out.stdout[-3000:]
