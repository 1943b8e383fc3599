"""The benchmark suite: ``python -m sslfast.bench`` (``sslfast-bench``) and
``python -m sslfast.bench.report``.

One module per op benchmark, each with ``cases(device, quick)``,
``providers(case, device)`` and ``run(device, quick, write, progress, ceil)``;
``harness`` times and records, ``check`` verifies the ops first, ``report``
renders the results.
"""

OPS = {
    "augment": "sslfast.bench.augment",
    "contrastive": "sslfast.bench.contrastive",
    "dino": "sslfast.bench.dino",
    "ema": "sslfast.bench.ema",
    "queue": "sslfast.bench.queue",
    "pretrain": "sslfast.bench.pretrain",
}
