#!/bin/sh
# Prints the CUDA toolkit root, or nothing. nvcc on PATH may be a wrapper
# script that execs the real one: follow it.
if [ -n "$CUDA_HOME" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then echo "$CUDA_HOME"; exit 0; fi
nvcc=$(command -v nvcc 2>/dev/null) || exit 0
real=$(readlink -f "$nvcc")
if head -c 2 "$real" 2>/dev/null | grep -q '#!'; then
  inner=$(grep -o '/[^ "]*/bin/nvcc' "$real" | head -n 1)
  [ -n "$inner" ] && real=$(readlink -f "$inner")
fi
root=$(dirname "$(dirname "$real")")
[ -f "$root/include/cuda_runtime.h" ] && echo "$root"
exit 0
