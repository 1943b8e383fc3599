"""Runs the benchmark of every op (``benchmarks/bench_<op>.py``), or some.

    python benchmarks/run.py [--quick] [--ops ema,...] [--device cpu|cuda] [--no-write]
"""

import argparse
import glob
import importlib
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def available_ops():
    return sorted(os.path.basename(p)[6:-3] for p in glob.glob(os.path.join(HERE, "bench_*.py")))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ops", default=None, help="comma-separated; default all: " + ",".join(available_ops()))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    ops = a.ops.split(",") if a.ops else available_ops()
    unknown = sorted(set(ops) - set(available_ops()))
    if unknown:
        p.error(f"--ops: no benchmark for {unknown}; available: {available_ops()}")
    for op in ops:
        print(f"==== {op} ====", flush=True)
        importlib.import_module(f"bench_{op}").run(torch.device(a.device), a.quick, not a.no_write)


if __name__ == "__main__":
    main()
