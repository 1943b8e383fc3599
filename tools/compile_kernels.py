"""Compiles every Triton kernel of sslfast ahead of time for GPU targets, on a
machine without a GPU: type and lowering errors that the interpreter cannot
see (it runs the kernels in NumPy) surface here. Prints one line per kernel
variant; exits 1 if any fails.

    python tools/compile_kernels.py [--archs 90,80] [--quick]
"""

import argparse
import itertools
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402

from sslfast.kernels import dino as DINO  # noqa: E402
from sslfast.kernels import dot_lse as K  # noqa: E402
from sslfast.kernels import dot_lse_pair as PAIR  # noqa: E402

# "tf32": fp32 features multiplied on TF32 tensor cores (not IEEE), as the kernels run
# them when torch's fp32 matmul precision is "tf32".
DTYPES = {"fp32": "*fp32", "tf32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
# The operands in the inputs' dtype (features; DINO's teacher/student outputs, and the
# DINO pass's output in its backward: the gradient); every other pointer is fp32, these
# scalars fp32, the rest int32.
INPUTS = {"q_ptr", "k_ptr", "x_ptr", "y_ptr", "t_ptr", "s0_ptr", "s1_ptr"}
FLOATS = {"inv_ts", "coef", "one_exp_spread"}
# Shared memory one block may opt into, per arch (bytes): a variant above it cannot
# launch there (the autotuner skips such a config; a fixed one would fail).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def variants(quick):
    """(kernel, feature dtype, constexprs) to compile."""
    out = []
    dtypes = ["bf16", "fp32"] if quick else list(DTYPES)
    single = [True] if quick else [True, False]
    for dt, sd in itertools.product(dtypes, single):
        blocks = {"BLOCK_R": 64, "BLOCK_C": 64, "BLOCK_D": 64, "SINGLE_D": sd}
        ieee = dt == "fp32"
        for split in (False, True):
            out.append((K._dot_lse_fwd_kernel, dt, {"HAS_EXCLUDE": True, "HAS_EXTRA": True,
                                                      "IEEE": ieee, "SPLIT": split, **blocks}))
        for two, both in ((False, False), (True, False), (True, True)):
            out.append((K._dot_lse_bwd_dq_kernel, dt, {"HAS_EXCLUDE": not both, "IEEE": ieee,
                                                         "STORE_DQ": True, "TWO_SIDED": two,
                                                         "DS_BOTH": both, **blocks}))
        out.append((K._dot_lse_bwd_dq_kernel, dt, {"HAS_EXCLUDE": False, "IEEE": ieee,
                                                     "STORE_DQ": False, "TWO_SIDED": False,
                                                     "DS_BOTH": False, **blocks}))
        out.append((K._dot_lse_bwd_dk_kernel, dt, {"HAS_EXCLUDE": True, "IEEE": ieee,
                                                     "NORM_G": dt == "fp16", **blocks}))
        pair = {"BLOCK": 64, "BLOCK_D": 64, "SINGLE_D": sd, "IEEE": ieee}
        for sym in (False, True):
            out.append((PAIR._dot_lse_pair_fwd_kernel, dt,
                        {"SYMMETRIC": sym, "EXCLUDE_DIAG": sym, **pair}))
            for need_dy in ((True,) if sym else (True, False)):
                out.append((PAIR._dot_lse_pair_bwd_kernel, dt,
                            {"SYMMETRIC": sym, "EXCLUDE_DIAG": sym, "NEED_DY": need_dy, **pair}))
        out.append((PAIR._dot_lse_pair_finalize_kernel, dt, {"EXCLUDE_DIAG": True, "IEEE": ieee,
                                                              **blocks}))
    if not quick:  # every autotune config of the tile-pair kernels (D = 128): bf16, and
        # TF32 where the pruning keeps them for fp32 (BLOCK_D <= 128)
        for fn, configs in ((PAIR._dot_lse_pair_fwd_kernel, PAIR._FWD_CONFIGS),
                            (PAIR._dot_lse_pair_bwd_kernel, PAIR._BWD_CONFIGS)):
            for c, dt in itertools.product(configs, ("bf16", "tf32")):
                if dt == "tf32" and c.kwargs["BLOCK_D"] > 128:
                    continue
                consts = {"SYMMETRIC": True, "EXCLUDE_DIAG": True, "IEEE": False, **c.kwargs,
                          "SINGLE_D": c.kwargs["BLOCK_D"] >= 128}
                if fn is PAIR._dot_lse_pair_bwd_kernel:
                    consts["NEED_DY"] = True
                out.append((fn, dt, consts, c.num_warps, c.num_stages))
    if not quick:  # every autotune config of the one-direction kernels (D = 128): bf16,
        # and IEEE fp32 where the pruning keeps them (BLOCK_D <= 128)
        for backward, configs in ((False, K._FWD_CONFIGS), (True, K._BWD_CONFIGS)):
            for c, dt in itertools.product(configs, ("bf16", "fp32")):
                if dt == "fp32" and c.kwargs["BLOCK_D"] > 128:
                    continue
                consts = {"IEEE": dt == "fp32", **c.kwargs,
                          "SINGLE_D": c.kwargs["BLOCK_D"] >= 128}
                launch = (c.num_warps, c.num_stages)
                if not backward:
                    out.append((K._dot_lse_fwd_kernel, dt, {
                        "HAS_EXCLUDE": True, "HAS_EXTRA": False, "SPLIT": False, **consts},
                        *launch))
                    continue
                out.append((K._dot_lse_bwd_dq_kernel, dt, {
                    "HAS_EXCLUDE": False, "STORE_DQ": True, "TWO_SIDED": True, "DS_BOTH": True,
                    **consts}, *launch))
                out.append((K._dot_lse_bwd_dk_kernel, dt, {
                    "HAS_EXCLUDE": True, "NORM_G": False, **consts}, *launch))
        # the fixed configs (tests, deterministic mode) with their own warps and stages
        fixed, pair_fixed = K._FIXED_GPU_CONFIG, PAIR._FIXED_GPU_CONFIG
        for dt in ("bf16", "fp32"):
            ieee = dt == "fp32"
            blocks = {k: fixed[k] for k in ("BLOCK_R", "BLOCK_C", "BLOCK_D")}
            out.append((K._dot_lse_bwd_dq_kernel, dt, {
                "HAS_EXCLUDE": True, "IEEE": ieee, "STORE_DQ": True, "TWO_SIDED": False,
                "DS_BOTH": False, **blocks, "SINGLE_D": True},
                fixed["num_warps"], fixed["num_stages"]))
            pair = {"SYMMETRIC": True, "EXCLUDE_DIAG": True, "IEEE": ieee, "SINGLE_D": True,
                    "BLOCK": pair_fixed["BLOCK"], "BLOCK_D": pair_fixed["BLOCK_D"]}
            pair_launch = (pair_fixed["num_warps"], pair_fixed["num_stages"])
            out.append((PAIR._dot_lse_pair_fwd_kernel, dt, pair, *pair_launch))
            out.append((PAIR._dot_lse_pair_bwd_kernel, dt, {**pair, "NEED_DY": True},
                        *pair_launch))
    for dt in [d for d in dtypes if d != "tf32"]:  # no dots
        block = {"BLOCK_K": DINO._GPU_CONFIG["BLOCK_K"]}
        warps = DINO._GPU_CONFIG["num_warps"]
        out.append((DINO._dino_teacher_lse_kernel, dt, block, warps, 3))
        # the launcher's ints equal to 1 arrive as constants (Triton specializes them)
        for ones in ({}, {"T": 1, "S": 1, "N": 1}):
            out += [(DINO._dino_pass_kernel, dt, {"BACKWARD": bw, **ones, **block}, warps, 3)
                    for bw in (False, True)]
    out.append((DINO._dino_merge_kernel, "fp32", {"BLOCK_P": DINO._MERGE_BLOCK}, 1, 3))
    return out


def compile_variant(fn, dtype, constexprs, arch, num_warps=4, num_stages=3):
    names = list(fn.arg_names)
    inputs = INPUTS | ({"out_ptr"} if constexprs.get("BACKWARD") else set())
    sig = {}
    for n in names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = DTYPES[dtype] if n in inputs else "*fp32"
        elif n in FLOATS:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return compile(src, target=GPUTarget("cuda", arch, 32),
                   options={"num_warps": num_warps, "num_stages": num_stages})


def describe(out, arch):
    """The cubin's size, its shared memory against the arch's limit, and which
    tensor-core instruction its dots became (sm_90's wgmma needs row tiles of 64)."""
    ptx = out.asm.get("ptx", "")
    dots = ("wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx
            else "no mma")
    shared = out.metadata.shared
    over = " (over the limit)" if shared > SHARED_LIMIT.get(arch, shared) else ""
    return f"{len(out.asm['cubin'])} B cubin, {shared} B shared{over}, {dots}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="90,80")
    p.add_argument("--quick", action="store_true", help="fewer variants")
    a = p.parse_args(argv)
    failed = 0
    for arch in (int(x) for x in a.archs.split(",")):
        for fn, dtype, consts, *launch in variants(a.quick):
            flags = ",".join(f"{k}={v}" for k, v in consts.items() if not k.startswith("BLOCK"))
            if launch:  # an autotune config: its tiles, warps and stages
                flags += " " + ",".join(f"{k}={v}" for k, v in consts.items()
                                        if k.startswith("BLOCK")) + " w{} s{}".format(*launch)
            t0 = time.perf_counter()
            try:
                out = compile_variant(fn, dtype, consts, arch, *launch)
                ok = bool(out.asm.get("cubin"))
                msg = describe(out, arch) if ok else "no cubin"
            except Exception as exc:  # noqa: BLE001 - report every failure
                ok, msg = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} sm_{arch} {fn.__name__} {dtype} {flags}: {msg} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
