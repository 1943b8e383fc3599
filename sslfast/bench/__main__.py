"""sslfast-bench: check every op against its reference, then benchmark it.

    python -m sslfast.bench [--check | --check-only] [--quick] [--ops ema,...]
                            [--cases TEXT,...] [--device cpu|cuda] [--no-write]
                            [--results DIR]

``--check`` first verifies every selected op against its reference on this
device (values and gradients, small and large shapes) and prints a pass/fail
table; an op that fails is not benchmarked and the command exits with status 1.
Then each op's benchmark runs (the full sweep, or ``--quick``: a one-minute
pass), on the GPU when there is one (else with CPU-sized cases), with the
device's ceilings measured once at the start, a progress bar on stderr, a table
per case, and JSON lines appended to the results folder. ``--cases`` keeps the
cases whose description (the op's case tuple as text, e.g. ``('ntxent', 8192,
128, 0, torch.bfloat16)``) holds every comma-separated word (``bfloat16``,
``ntxent``, ``8192``): a sweep too long for one call can be split, e.g.
``--cases bfloat16`` then ``--cases float32``; the report merges the parts of one
clean commit.
"""

import argparse
import importlib
import sys

import torch

from sslfast.bench import OPS, check, harness


def _parser():
    p = argparse.ArgumentParser(prog="sslfast-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="verify every op first")
    p.add_argument("--check-only", action="store_true", help="verify, do not benchmark")
    p.add_argument("--quick", action="store_true", help="small cases, short timing")
    p.add_argument("--ops", default=None, help="comma-separated; default all: " + ",".join(OPS))
    p.add_argument("--cases", default=None,
                   help="comma-separated words a case's description must all hold")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-write", action="store_true", help="do not append to the results")
    p.add_argument("--results", default=None,
                   help=f"folder of the JSON-lines results (default {harness.RESULTS})")
    return p


def main(argv=None):
    p = _parser()
    a = p.parse_args(argv)
    ops = a.ops.split(",") if a.ops else list(OPS)
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        p.error(f"--ops: no benchmark for {unknown}; available: {list(OPS)}")
    harness.use_results(a.results)
    device = torch.device(a.device)
    failed = []
    if a.check or a.check_only:
        print(f"==== check on {harness.device_name(device)} ====", flush=True)
        failed = check.print_table(check.run_checks(ops, device, a.quick))
        if failed:
            print(f"\nCHECK FAILED for {', '.join(failed)}: not benchmarked", file=sys.stderr)
        else:
            print("\nevery check passed")
    if a.check_only:
        return 1 if failed else 0
    modules = {op: importlib.import_module(OPS[op]) for op in ops if op not in failed}
    words = a.cases.split(",") if a.cases else None
    total = sum(len(harness.selected(m.cases(device, a.quick), words)) for m in modules.values())
    if a.cases and not total:
        p.error(f"--cases {a.cases}: no case of {list(modules)} matches")
    progress = harness.Progress(total)
    ceil = harness.ceilings(device, a.quick) if modules else None
    for op, module in modules.items():
        print(f"==== {op} ====", flush=True)
        module.run(device, a.quick, not a.no_write, progress=progress, ceil=ceil, select=words)
    progress.close()
    return 1 if failed else 0


def cli():
    sys.exit(main())


if __name__ == "__main__":
    cli()
