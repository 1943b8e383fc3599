"""Every op's benchmark, from the checkout: the same as ``python -m sslfast.bench``.

    python benchmarks/run.py [--check] [--quick] [--ops ema,...] [--device cpu|cuda] [--no-write]
"""

from sslfast.bench.__main__ import cli

if __name__ == "__main__":
    cli()
