"""Every Triton kernel variant compiles ahead of time for Hopper (sm_90) and
Ampere (sm_80) — on a machine without a GPU too. The interpreter runs the
kernels' arithmetic in NumPy; this catches what only the GPU compiler sees
(types, layouts, lowering)."""

import os
import re
import subprocess
import sys

import pytest

from tests.utils import ROOT


@pytest.mark.parametrize("archs, quick", [("90", False), ("80", True)])
def test_triton_kernels_compile_for_gpu_targets(archs, quick):
    pytest.importorskip("triton")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "compile_kernels.py"), "--archs", archs]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(cmd + (["--quick"] if quick else []), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 failed" in out.stdout and "FAIL" not in out.stdout
    if archs == "90":
        # Hopper's wgmma takes row tiles of 64 per warp group: a bf16 variant whose
        # row and column tiles are all >= 64 must use it (mma.sync runs at a fraction
        # of its rate); variants without BLOCK in their line have 64-tiles.
        for line in out.stdout.splitlines():
            if " bf16 " not in line or "_dino_" in line:
                continue
            tiles = [int(v) for v in re.findall(r"\bBLOCK(?:_R|_C)?=(\d+)", line)] or [64]
            if min(tiles) >= 64:
                assert line.rstrip().split(", ")[-1].startswith("wgmma"), line
