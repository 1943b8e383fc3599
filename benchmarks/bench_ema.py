"""The ema benchmark (sslfast/bench/ema.py), from the checkout.

    python benchmarks/bench_ema.py [--quick] [--device cpu|cuda] [--no-write]
"""

from sslfast.bench.ema import main

if __name__ == "__main__":
    main()
