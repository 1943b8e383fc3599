"""The pretrain benchmark (sslfast/bench/pretrain.py), from the checkout.

    python benchmarks/bench_pretrain.py [--quick] [--device cpu|cuda] [--no-write]
"""

from sslfast.bench.pretrain import main

if __name__ == "__main__":
    main()
