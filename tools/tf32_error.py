"""The TF32 error of the contrastive kernels, under the Triton interpreter (which
truncates fp32 tiles to TF32's 10 mantissa bits, the worst case): for each case of
the kernel tests, the largest error of lse and of each gradient against float64,
relative to that tensor's magnitude (the tests' measure; their TF32 tolerance is
tests/test_dot_lse_kernels.py's TF32_TOL).

    python tools/tf32_error.py
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tests import test_dot_lse_kernels as one  # noqa: E402
from tests import test_dot_lse_pair_kernels as pair  # noqa: E402


def _err(actual, expected, magnitude):
    diff = (actual.double().cpu() - expected.double().cpu()).abs().max()
    return float(diff) / max(float(magnitude), 1e-30)


def main():
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.manual_seed(0)
    worst = {}
    print("dot_lse (one direction): case -> lse dq dk dscale")
    for case in one.CASES + [(64, 200, 128, 0, True, 20.0), (64, 200, 128, None, False, 100.0)]:
        R, C, D, off, extra, scale = case
        q, k, ex, g = one.make_inputs(R, C, D, torch.float32, "cpu", 1.0, extra)
        s = torch.tensor(scale)
        lse = one.dot_lse_forward(q, k, s, off, ex)
        got = (lse, *one.dot_lse_backward(q, k, s, lse, g, off))
        ref, mags = one.reference(q, k, s, off, ex, g)
        errs = [_err(a, b, m) for a, b, m in zip(got, ref, mags)]
        print(f"  {case}: " + " ".join(f"{e:.1e}" for e in errs))
        worst["lse"] = max(worst.get("lse", 0), errs[0])
        worst["grad"] = max(worst.get("grad", 0), *errs[1:])
    print("dot_lse_pair: (R, C, D, scale, symmetric) -> lse_x lse_y dx dy dscale")
    for R, C, D, scale in pair.CLIP_CASES:
        for symmetric in (False, True) if R > 1 else (False,):  # R = 1 symmetric: no pairs
            C = R if symmetric else C
            x, y = pair.features(R, D, torch.float32), pair.features(C, D, torch.float32)
            y = None if symmetric else y
            g, h = torch.rand(R) + 0.5, None if symmetric else torch.rand(C) + 0.5
            s = torch.tensor(scale)
            got = pair.run_pair(x, y, s, symmetric, g, h, config=pair.SMALL_CONFIG, splits=2)
            ref, mags = pair.reference(x, y, s, symmetric, g, h)
            errs = [_err(a, b, m) for a, b, m in
                    zip(got, ref, (mags[0], mags[0], mags[1], mags[2], mags[3])) if a is not None]
            print(f"  {(R, C, D, scale, symmetric)}: " + " ".join(f"{e:.1e}" for e in errs))
            worst["lse"] = max(worst["lse"], *errs[:2])
            worst["grad"] = max(worst["grad"], *errs[2:])
    print(f"worst: lse {worst['lse']:.1e}, gradients {worst['grad']:.1e} "
          f"(tolerance {one.TF32_TOL[0]:.0e}, {one.TF32_TOL[1]:.0e})")


if __name__ == "__main__":
    main()
