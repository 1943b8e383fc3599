"""Shared benchmark machinery: timing, peak memory, device ceilings, progress,
JSON lines.

Every op's benchmark (``sslfast/bench/<op>.py``) times its providers with
``measure_all`` and appends one JSON line per (provider, case) to
``<results>/<op>.jsonl`` through ``write_records``. Results are only ever
appended; ``sslfast.bench.report`` renders them. The results folder: the
environment variable ``SSLFAST_RESULTS``, else ``benchmarks/results`` of the
source checkout sslfast runs from, else ``./benchmarks/results``. Each line names
the git commit it ran at (``-dirty`` with uncommitted code changes); where there is
no git (a tree copied without ``.git``), the environment variable ``SSLFAST_COMMIT``.
"""

import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

from sslfast._memory import peak_memory

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IN_CHECKOUT = os.path.isdir(os.path.join(_CHECKOUT, "benchmarks")) and os.path.isfile(
    os.path.join(_CHECKOUT, "setup.py"))
ROOT = _CHECKOUT if IN_CHECKOUT else os.getcwd()
RESULTS = os.environ.get("SSLFAST_RESULTS") or os.path.join(ROOT, "benchmarks", "results")


def _git(*args):
    try:
        return subprocess.check_output(["git", *args], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def environment(device):
    """What a result line needs to be interpreted later."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = _git("rev-parse", "HEAD")
    # Only the code counts: the results a run appends must not mark its later ops dirty.
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", "sslfast", "csrc",
                      "setup.py", "pyproject.toml"))
    if commit is None:  # a tree without .git (a device machine): the caller names its commit
        commit, dirty = os.environ.get("SSLFAST_COMMIT") or None, False
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": (commit + ("-dirty" if dirty else "")) if commit else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, quick=False):
    """(median, 20th percentile, 80th percentile) of fn's run time, in ms.

    GPU: triton.testing.do_bench (L2 flushed between runs). CPU: wall clock of
    repeated calls after a warm-up, at least 5 runs and about 1 s (0.3 s quick).
    """
    if device.type == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=25 if quick else 100, rep=100 if quick else 500,
                                    quantiles=[0.5, 0.2, 0.8])
        return tuple(float(x) for x in q)
    budget = 0.3 if quick else 1.0
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return summary(times)


def summary(times):
    """(median, 20th, 80th percentile) of a list of timings."""
    if len(times) < 2:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def measure(fn, device, quick=False):
    """Timing and peak memory of one provider on one case."""
    _, peak = peak_memory(fn, device)
    median, p20, p80 = time_ms(fn, device, quick)
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "peak_mem_bytes": peak}


def measure_all(fns, device, quick=False, min_runs=5):
    """{name: measure(...)} for several providers of one case.

    On the CPU the providers are timed round-robin, one call each per round, so
    that a change in background load shifts all of them alike.
    """
    peaks = {name: peak_memory(fn, device)[1] for name, fn in fns.items()}
    if device.type == "cuda":
        times = {name: time_ms(fn, device, quick) for name, fn in fns.items()}
    else:
        budget = (0.3 if quick else 1.0) * len(fns)
        runs = {name: [] for name in fns}
        start = time.perf_counter()
        while min(len(r) for r in runs.values()) < min_runs or (
            time.perf_counter() - start < budget and min(len(r) for r in runs.values()) < 200
        ):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                runs[name].append((time.perf_counter() - t0) * 1e3)
        times = {name: summary(r) for name, r in runs.items()}
    return {
        name: {"median_ms": t[0], "p20_ms": t[1], "p80_ms": t[2], "peak_mem_bytes": peaks[name]}
        for name, t in times.items()
    }


def _bandwidth(device, quick):
    """(copy GB/s, in-place add GB/s) over buffers far larger than any cache."""
    n_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, quick)[0]
    add_ms = time_ms(lambda: dst.add_(src), device, quick)[0]
    return 2 * n_bytes / copy_ms / 1e6, 3 * n_bytes / add_ms / 1e6  # read + write; 2 reads + write


def _matmul_tflops(device, dtype, quick):
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / time_ms(lambda: a @ b, device, quick)[0] / 1e9


def ceilings(device, quick=False):
    """The device's own peaks, measured now: copy bandwidth and matmul rate.

    The in-place add moves 12 bytes per fp32 element like an EMA; on CPUs a
    plain copy also pays an unseen read of the destination, so mem_gbps is the
    better of the two."""
    out = {}
    out["copy_gbps"], out["add_gbps"] = _bandwidth(device, quick)
    out["mem_gbps"] = max(out["copy_gbps"], out["add_gbps"])
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    for dt in dtypes:
        out[f"matmul_{str(dt)[6:]}_tflops"] = _matmul_tflops(device, dt, quick)
    return out


def add_speedups(rows, reference="reference", key="median_ms"):
    """speedup_vs_reference / speedup_vs_best_other (non-sslfast providers) and
    mem_vs_reference on every row that ran; rows that ran out of memory are skipped.
    key: the figure compared, a time (lower is better) or a rate ("..._per_s")."""
    ok = [r for r in rows if key in r]
    rate = key.endswith("_per_s")
    speed = (lambda r: r[key]) if rate else (lambda r: 1 / r[key])
    ref = next((r for r in ok if r["provider"] == reference), None)
    others = [speed(r) for r in ok if not r["provider"].startswith("sslfast")]
    for r in ok:
        r["speedup_vs_reference"] = speed(r) / speed(ref) if ref else None
        r["speedup_vs_best_other"] = speed(r) / max(others) if others else None
        if ref and ref.get("peak_mem_bytes") and r.get("peak_mem_bytes") is not None:
            r["mem_vs_reference"] = r["peak_mem_bytes"] / ref["peak_mem_bytes"]


def parser(doc):
    """The command line every op's benchmark shares: --quick, --device, --no-write,
    --results."""
    import argparse

    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small cases, short timing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-write", action="store_true", help="do not append to the results")
    p.add_argument("--results", default=None,
                   help=f"folder of the JSON-lines results (default {RESULTS})")
    return p


class Progress:
    """A progress bar over the cases of a run: one line per case when stderr is
    not a terminal, a redrawn bar when it is."""

    def __init__(self, total, stream=None):
        self.total, self.done, self.start = max(total, 1), 0, time.perf_counter()
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, label):
        self.done += 1
        width = 24
        filled = width * (self.done - 1) // self.total
        bar = "#" * filled + "." * (width - filled)
        elapsed = time.perf_counter() - self.start
        line = f"[{bar}] {self.done}/{self.total} {elapsed:5.0f}s  {label}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def selected(cases, words=None):
    """The cases whose text (the case tuple as text) holds every word of ``words`` as
    a word of its own, a dotted word also by its last part ("float16" is
    torch.float16, not torch.bfloat16); all of them when ``words`` is None."""
    if not words:
        return list(cases)

    def own(case):
        out = set(re.findall(r"[\w.]+", str(case)))
        return out | {w.rsplit(".", 1)[-1] for w in out}

    return [c for c in cases if set(words) <= own(c)]


def finish(op, records, write):
    """Appends the run's records to benchmarks/results/<op>.jsonl (if write); returns them."""
    if write:
        print("  results appended to", write_records(op, records))
    return records


def cli(run, doc, argv=None):
    """An op benchmark's command line: run(device, quick, write)."""
    a = parser(doc).parse_args(argv)
    use_results(a.results)
    run(torch.device(a.device), a.quick, not a.no_write)


def use_results(folder):
    """Sends this process's results to ``folder`` (None: leave the default)."""
    global RESULTS
    if folder:
        RESULTS = folder


@contextlib.contextmanager
def fp32_precision(value, setting=None):
    """torch's fp32 precision ("tf32" or "ieee") of ``setting`` set to ``value`` inside
    the block and restored after (torch 2.9+'s fp32_precision). setting: the
    torch.backends object, default torch.backends.cuda.matmul (matmuls, and with them
    sslfast's Triton kernels); torch.backends.cudnn.conv for convolutions."""
    setting = torch.backends.cuda.matmul if setting is None else setting
    prev = setting.fp32_precision
    setting.fp32_precision = value
    try:
        yield
    finally:
        setting.fp32_precision = prev


def record_line(r):
    """A record as its JSON line (keys sorted: one record, one line)."""
    return json.dumps(r, sort_keys=True)


def write_records(op, records, results_dir=None):
    """Append records as JSON lines to <results>/<op>.jsonl (default RESULTS)."""
    results_dir = results_dir or RESULTS
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{op}.jsonl")
    with open(path, "a") as f:
        f.writelines(record_line(r) + "\n" for r in records)
    return path


def print_table(records, columns):
    """A compact aligned table of chosen record fields."""
    rows = [[_fmt(r.get(c)) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def matmul_bench_start(device, quick, title, ceil=None):
    """(environment, ceilings, key of the matmul peak) for a matmul-bound
    benchmark: bf16 on a GPU, fp32 on the CPU; both printed. ceil: ceilings
    measured earlier in the same run, or None to measure them now."""
    env = environment(device)
    print(f"{title} benchmark on {env['device']} (torch {env['torch']})")
    ceil = ceil or ceilings(device, quick)
    peak_key = "matmul_bfloat16_tflops" if device.type == "cuda" else "matmul_float32_tflops"
    print(f"  matmul ceiling {ceil[peak_key]:.1f} TFLOP/s ({peak_key})")
    return env, ceil, peak_key


def bandwidth_bench_start(device, quick, title, ceil=None):
    """(environment, ceilings) for a memory-bound benchmark, the bandwidths printed."""
    env = environment(device)
    print(f"{title} benchmark on {env['device']} (torch {env['torch']})")
    ceil = ceil or ceilings(device, quick)
    print(f"  memory bandwidth: copy {ceil['copy_gbps']:.1f} GB/s, in-place add "
          f"{ceil['add_gbps']:.1f} GB/s")
    return env, ceil


def autocast_to(device, dtype):
    """How providers that take fp32 weights (lightly's losses, torchvision models) run
    at a low-precision dtype: under autocast; fp32 runs without."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def backward_steps(fns, leaves):
    """{name: a call that clears the leaves' gradients, then runs fn and backpropagates
    the loss it returns} for the loss providers of one case."""

    def step(fn):
        def run():
            for x in leaves:
                x.grad = None
            fn().backward()
        return run

    return {name: step(fn) for name, fn in fns.items()}


def trial_runs(fns):
    """One call of each provider first: one that runs out of GPU memory or fails
    (any exception: e.g. a third-party kernel that does not compile) is recorded
    ({"oom": True} / {"error": ...}) and removed from ``fns``."""
    failed = {}
    for name, fn in list(fns.items()):
        try:
            fn()
        except torch.cuda.OutOfMemoryError:
            failed[name] = {"oom": True}
            del fns[name]
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - a third-party provider may fail any way
            print(f"  {name} failed: {type(exc).__name__}: {exc}")
            failed[name] = {"error": str(exc)[:200]}
            del fns[name]
    return failed


TFLOPS_COLUMNS = ["provider", "median_ms", "p20_ms", "p80_ms", "peak_mem_bytes", "tflops",
                  "pct_of_peak", "speedup_vs_reference", "speedup_vs_best_other",
                  "mem_vs_reference", "oom"]


def tflops_case(env, measured, fields, flops, ceil, peak_key, title, extra_columns=()):
    """The records of one matmul-bound case (one per provider): env, fields and
    each provider's measurements, its TFLOP/s and % of the measured peak, and
    the speedups; printed as a table under ``title``."""
    rows = []
    for name, m in measured.items():
        r = {**env, **fields, "provider": name, "flops": flops, "ceilings": ceil,
             "ceiling_tflops": ceil[peak_key], **m}
        if "median_ms" in m:
            r["tflops"] = flops / m["median_ms"] / 1e9
            r["pct_of_peak"] = 100 * r["tflops"] / ceil[peak_key]
        rows.append(r)
    add_speedups(rows)
    print(f"\n  {title}")
    cols = TFLOPS_COLUMNS[:7] + list(extra_columns) + TFLOPS_COLUMNS[7:]
    print_table(rows, cols)
    return rows
