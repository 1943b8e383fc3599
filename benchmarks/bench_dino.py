"""The DINO loss benchmark (sslfast/bench/dino.py), from the checkout.

    python benchmarks/bench_dino.py [--quick] [--device cpu|cuda] [--no-write]
"""

from sslfast.bench.dino import main

if __name__ == "__main__":
    main()
