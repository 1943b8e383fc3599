#!/usr/bin/env bash
# On a machine with a CUDA GPU (and torch, pytest, timm installed): build the
# extension in place, run the GPU tests, check every op against its reference and
# run the benchmark of every op (sslfast-bench --check).
#
#     bash benchmarks/gpu_run.sh OUTDIR [--quick] [--ops ema,...] [--cases TEXT,...]
#                                   [--no-tests] [--no-bench]
#                                   (OUTDIR default: $OUT, else ./gpu_out)
#
# OUTDIR receives few files (a device call returns at most 8): run.log (GPU, source
# digest, build, tests, benchmarks: everything printed) and results/<op>.jsonl with
# this run's result lines only. Append those to benchmarks/results/ with
# `python -m sslfast.bench.report --add OUTDIR/results`, which also renders REPORT.md.
#
# The GPU tests are the `cuda`-marked ones; on a GPU machine conftest adds the tests
# marked `triton` (there their kernels run on the GPU, not in the interpreter). They
# use one fixed Triton config (SSLFAST_TRITON_AUTOTUNE=0, set by conftest) and run in
# $TEST_WORKERS processes (default 4) where pytest-xdist is installed, each stopped
# after $TEST_TIMEOUT seconds (default 480); the benchmarks autotune. A full run takes
# longer than one 10-minute device call: split it with --ops, --cases (e.g. the
# contrastive sweep: --cases bfloat16, then --cases float32), --quick, --no-tests or
# --no-bench. The build is skipped when the extension was already built here from
# the same sources, torch and GPU (build/gpu_run.stamp): a warm machine's later
# calls start at once.
#
# Where the tree travels without .git, results record SSLFAST_COMMIT (give the
# commit the tree is at); run.log's source digest lets you check that it is.
# Pure-Python wheels in .whl/ (lightly, kornia, pytest-xdist, ...; git-ignored: give
# the device call carry [".whl"]) are installed first. Exit status: the build's, else
# the first failing of the tests and the benchmarks (0 when all passed).
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
main() {
  export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
  # Build for the GPU that is here only (the default builds sm_80 and sm_90).
  arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2> /dev/null)
  export SSLFAST_CUDA_ARCHS=${SSLFAST_CUDA_ARCHS:-${arch:-8.0;9.0}}
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  digest=$(bash tools/source_digest.sh)
  echo "source digest $digest; commit ${SSLFAST_COMMIT:-(from git, if here)}"
  start=$(date +%s)
  stamp="$digest torch $(python3 -c 'import torch; print(torch.__version__)') sm $SSLFAST_CUDA_ARCHS"
  if [ "$(cat build/gpu_run.stamp 2> /dev/null)" = "$stamp" ] \
      && python3 -c "import sslfast, sys; sys.exit(not sslfast.has_cuda_kernels())" 2> /dev/null; then
    echo "build: up to date ($stamp)"
  else
    if ! python3 -m pip install --no-build-isolation --no-deps -e . > /tmp/sslfast_build.log 2>&1; then
      tail -n 60 /tmp/sslfast_build.log; return 1
    fi
    if ! python3 -c "import sslfast, sys; sys.exit(not sslfast.has_cuda_kernels())"; then
      echo "build: the extension has no CUDA kernels (nvcc or CUDA_HOME not found?)"
      grep -m 3 "sslfast: building" /tmp/sslfast_build.log; return 1
    fi
    mkdir -p build && echo "$stamp" > build/gpu_run.stamp
    echo "build (sm ${SSLFAST_CUDA_ARCHS}): $(( $(date +%s) - start )) s"
  fi
  status=0
  if [ "$run_tests" = 1 ]; then
    workers=()
    if python3 -c "import xdist" 2> /dev/null; then workers=(-n "${TEST_WORKERS:-4}"); fi
    timeout "${TEST_TIMEOUT:-480}" python3 -m pytest tests -m cuda -q -rfEs --durations=25 \
      ${workers[@]+"${workers[@]}"}
    rc=$?
    echo "tests done (status $rc): $(( $(date +%s) - start )) s"
    [ "$status" != 0 ] || status=$rc
  fi
  if [ "$run_bench" = 1 ]; then
    python3 -m sslfast.bench --check --results "$out/results" ${bench_args[@]+"${bench_args[@]}"}
    rc=$?
    echo "benchmarks done (status $rc)"
    [ "$status" != 0 ] || status=$rc
  fi
  df -h /dev/shm | tail -n 1; echo "open files limit $(ulimit -n)"
  echo "done in $(( $(date +%s) - start )) s (status $status); files in $out"
  return "$status"
}

mkdir -p "$out/results"
main 2>&1 | tee -a "$out/run.log"
exit "${PIPESTATUS[0]}"
