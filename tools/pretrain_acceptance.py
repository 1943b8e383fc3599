"""The README's pretraining figures: runs ``python -m sslfast.pretrain`` (the
default ``--method simclr`` on the embedded data unless other arguments are
given) in a fresh process, times it end to end, and appends one JSON line —
machine, versions, commit, arguments, wall time, steps, images/s, the kNN
accuracy and the random-init baseline from the run's own log — to
``benchmarks/results/pretrain_embedded.jsonl``.

    python tools/pretrain_acceptance.py [pretrain arguments ...] [--no-write]
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from sslfast.bench import harness


def main(argv):
    write = "--no-write" not in argv
    args = [a for a in argv if a != "--no-write"]
    if not any(a == "--method" for a in args):
        args = ["--method", "simclr", *args]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        start = time.time()
        subprocess.run([sys.executable, "-m", "sslfast.pretrain", *args, "--output-dir", out],
                       check=True)
        wall = time.time() - start
        with open(os.path.join(out, "log.jsonl")) as f:
            events = [json.loads(line) for line in f]
    steps = [e for e in events if e["event"] == "step"]
    knn = next((e for e in events if e["event"] == "knn"), {})
    record = {
        "op": "pretrain_embedded", **harness.environment(torch.device("cpu")),
        "cpu_count": os.cpu_count(), "args": args, "wall_seconds": round(wall, 1),
        "train_seconds": knn.get("train_seconds"), "steps": steps[-1]["step"] if steps else 0,
        "final_loss": steps[-1]["loss"] if steps else None,
        "images_per_s": steps[-1]["images_per_s"] if steps else None,
        "knn_accuracy": knn.get("knn_accuracy"),
        "random_init_knn_accuracy": knn.get("random_init_knn_accuracy"),
        "knn_k": knn.get("k"), "knn_t": knn.get("t"),
    }
    print(json.dumps(record, indent=1))
    harness.finish("pretrain_embedded", [record], write)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
