"""Times NT-Xent's two CPU paths back to back, forward + backward of mean_i lse_i over
s Z Z^T (diagonal excluded): the symmetric blocks (q is k, the path NT-Xent takes on
one process) against the one-direction blocks (forced by passing a view of z as k),
alternating calls; prints each path's median. Shows what the shared-VM benchmark
files cannot isolate from run-to-run drift.

    python tools/ntxent_cpu_paths.py [--rows 16384] [--dim 128] [--repeats 6]
"""

import argparse
import statistics
import time

import torch

from sslfast.ops.dot_lse import dot_lse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16384, help="2N")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=6)
    a = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(a.rows, a.dim, generator=g), dim=1)
    z.requires_grad_()
    s = torch.tensor(2.0)

    def step(symmetric):
        t = time.perf_counter()
        dot_lse(z, z if symmetric else z.view_as(z), s, 0, None, backend="cpu").backward()
        z.grad = None
        return time.perf_counter() - t

    step(True), step(False)  # warm-up
    times = {True: [], False: []}
    for i in range(2 * a.repeats):
        times[i % 2 == 0].append(step(i % 2 == 0))
    for sym, name in ((True, "symmetric"), (False, "one-direction")):
        print(f"{name}: median {1e3 * statistics.median(times[sym]):.0f} ms over "
              f"{a.repeats} ({', '.join(f'{1e3 * t:.0f}' for t in times[sym])})")
    print(f"2N={a.rows} D={a.dim} fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
