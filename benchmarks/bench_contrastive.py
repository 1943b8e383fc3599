"""The contrastive benchmark (sslfast/bench/contrastive.py), from the checkout.

    python benchmarks/bench_contrastive.py [--quick] [--device cpu|cuda] [--no-write]
"""

from sslfast.bench.contrastive import main

if __name__ == "__main__":
    main()
