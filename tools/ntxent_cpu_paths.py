"""Times NT-Xent's CPU paths back to back, forward + backward of mean_i lse_i over
s Z Z^T (diagonal excluded): the symmetric blocks (q is k, the path NT-Xent takes on
one process) against the one-direction blocks (forced by passing a view of z as k),
and with --baseline COMMIT against that commit's symmetric path (its _cpu_symmetric,
read with git show, run in this checkout's module); calls interleaved, order
alternating; prints each path's median. Shows what the shared-VM benchmark files
cannot isolate from run-to-run drift. --profile: also the torch.profiler table (the
ops with the most self time) of one call of each path.

    python tools/ntxent_cpu_paths.py [--rows 16384] [--dim 128] [--repeats 6]
                                     [--baseline COMMIT] [--profile]
"""

import argparse
import statistics
import subprocess
import time

import torch

from sslfast.ops import dot_lse as module


def _baseline(commit):
    """_cpu_symmetric as it was at commit, bound to this checkout's module globals."""
    src = subprocess.run(["git", "show", f"{commit}:sslfast/ops/dot_lse.py"], check=True,
                         capture_output=True, text=True).stdout
    start = src.index("def _cpu_symmetric(")
    namespace = dict(vars(module))
    exec(src[start:src.index("\ndef ", start + 1)], namespace)  # noqa: S102 - our own file
    return namespace["_cpu_symmetric"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16384, help="2N")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--baseline", metavar="COMMIT", help="also time this commit's symmetric path")
    p.add_argument("--profile", action="store_true", help="profile one call of each path")
    a = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(a.rows, a.dim, generator=g), dim=1)
    z.requires_grad_()
    s = torch.tensor(2.0)
    current = module._cpu_symmetric
    paths = {"symmetric": (current, True), "one-direction": (current, False)}
    if a.baseline:
        paths[f"symmetric at {a.baseline}"] = (_baseline(a.baseline), True)

    def step(path):
        fn, symmetric = paths[path]
        module._cpu_symmetric = fn
        t = time.perf_counter()
        try:
            module.dot_lse(z, z if symmetric else z.view_as(z), s, 0, None,
                           backend="cpu").backward()
        finally:
            module._cpu_symmetric = current
        z.grad = None
        return time.perf_counter() - t

    names = list(paths)
    for name in names:  # warm-up
        step(name)
    times = {name: [] for name in names}
    for i in range(a.repeats):
        for name in names if i % 2 == 0 else reversed(names):
            times[name].append(step(name))
    for name in names:
        print(f"{name}: median {1e3 * statistics.median(times[name]):.0f} ms over "
              f"{a.repeats} ({', '.join(f'{1e3 * t:.0f}' for t in times[name])})")
    print(f"2N={a.rows} D={a.dim} fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in names:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(name)
            print(f"\n{name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total",
                                                              row_limit=8))


if __name__ == "__main__":
    main()
