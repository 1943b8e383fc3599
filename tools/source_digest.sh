#!/usr/bin/env bash
# A digest of the code a build and a benchmark run depend on: the .py/.cu/.cpp/.h
# files under sslfast/ and csrc/ plus setup.py and pyproject.toml, names included.
# It needs no git, so it is the same here and on a machine the tree travelled to
# without .git exactly when the code is: gpu_run.sh prints it and keys its build on it.
cd "$(dirname "$0")/.." || exit 1
find sslfast csrc setup.py pyproject.toml -type f \
    \( -name '*.py' -o -name '*.cu' -o -name '*.cpp' -o -name '*.h' -o -name '*.toml' \) \
    -not -path '*/__pycache__/*' -print0 \
  | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
