"""The augment benchmark (sslfast/bench/augment.py), from the checkout.

    python benchmarks/bench_augment.py [--quick] [--device cpu|cuda] [--no-write]
"""

from sslfast.bench.augment import main

if __name__ == "__main__":
    main()
