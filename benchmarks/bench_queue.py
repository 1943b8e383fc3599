"""The queue benchmark (sslfast/bench/queue.py), from the checkout.

    python benchmarks/bench_queue.py [--quick] [--device cpu|cuda] [--no-write]
"""

from sslfast.bench.queue import main

if __name__ == "__main__":
    main()
