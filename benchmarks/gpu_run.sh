#!/usr/bin/env bash
# On a machine with a CUDA GPU (and torch, pytest, timm installed): build the
# extension in place, run the GPU tests, run the benchmark of every op, and
# leave logs and result files in one folder.
#
#     bash benchmarks/gpu_run.sh OUTDIR        (default: $OUT, else ./gpu_out)
#
# Pure-Python wheels in .whl/ (lightly, kornia, ...) are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_out}}
mkdir -p "$out"
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv > "$out/gpu.txt" 2>&1
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1; then
  tail -n 60 "$out/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
python3 -m pytest tests -m cuda -q -rs 2>&1 | tee "$out/pytest_cuda.log" | tail -n 25
python3 benchmarks/run.py 2>&1 | tee "$out/bench.log" | tail -n 60
cp benchmarks/results/*.jsonl "$out/"
echo "done in $(( $(date +%s) - start )) s; files in $out"
