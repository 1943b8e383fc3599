"""Renders benchmarks/REPORT.md, its plots and the README's results table from
benchmarks/results/ (the same as ``python -m sslfast.bench.report``)."""

from sslfast.bench.report import main

if __name__ == "__main__":
    main()
