#!/usr/bin/env bash
# On a machine with a CUDA GPU (and torch, pytest, timm installed): build the
# extension in place, run the GPU tests, check every op against its reference and
# run the benchmark of every op (sslfast-bench --check), and leave logs, result
# files and the rendered report in one folder.
#
#     bash benchmarks/gpu_run.sh OUTDIR [--quick] [--ops ema,...] [--cases TEXT,...]
#                                   [--no-tests] [--no-bench]
#                                   (OUTDIR default: $OUT, else ./gpu_out)
#
# The GPU tests are the `cuda`-marked ones; on a GPU machine conftest adds the tests
# marked `triton` (there their kernels run on the GPU, not in the interpreter). They
# use one fixed Triton config (SSLFAST_TRITON_AUTOTUNE=0, set by conftest) and run in
# $TEST_WORKERS processes (default 4) where pytest-xdist is installed, each stopped
# after $TEST_TIMEOUT seconds (default 480); the benchmarks autotune. A full run takes
# longer than one 10-minute device call: split it with --ops, --cases (e.g. the
# contrastive sweep: --cases bfloat16, then --cases float32), --quick, --no-tests or
# --no-bench.
# Pure-Python wheels in .whl/ (lightly, kornia, pytest-xdist, ...) are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then out=$1; shift; fi
run_tests=1
run_bench=1
bench_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-tests) run_tests=0 ;;
    --no-bench) run_bench=0 ;;
    --quick) bench_args+=(--quick) ;;
    --ops) bench_args+=(--ops "$2"); shift ;;
    --cases) bench_args+=(--cases "$2"); shift ;;
    *) echo "gpu_run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
# Build for the GPU that is here only (the default builds sm_80 and sm_90).
arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2> /dev/null)
export SSLFAST_CUDA_ARCHS=${SSLFAST_CUDA_ARCHS:-${arch:-8.0;9.0}}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv > "$out/gpu.txt" 2>&1
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1; then
  tail -n 60 "$out/build.log"; exit 1
fi
echo "build (sm ${SSLFAST_CUDA_ARCHS}): $(( $(date +%s) - start )) s"
if [ "$run_tests" = 1 ]; then
  workers=()
  if python3 -c "import xdist" 2> /dev/null; then workers=(-n "${TEST_WORKERS:-4}"); fi
  timeout "${TEST_TIMEOUT:-480}" python3 -m pytest tests -m cuda -q -rfEs --durations=25 \
    ${workers[@]+"${workers[@]}"} 2>&1 | tee "$out/pytest_cuda.log" | tail -n 40
  echo "tests done (status ${PIPESTATUS[0]}): $(( $(date +%s) - start )) s"
fi
if [ "$run_bench" = 1 ]; then
  python3 -m sslfast.bench --check ${bench_args[@]+"${bench_args[@]}"} 2>&1 | tee "$out/bench.log" | tail -n 60
  cp benchmarks/results/*.jsonl "$out/"
  python3 -m sslfast.bench.report --no-readme --out "$out/REPORT.md" > "$out/report.log" 2>&1 || true
fi
echo "done in $(( $(date +%s) - start )) s; files in $out"
