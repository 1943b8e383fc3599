"""Checks the path a user installs by: an sdist of this tree, a wheel built from that
sdist alone, and the package imported from the wheel outside the checkout.

    python tools/dist_check.py [--workdir DIR]

1. Copies the tree's files (tracked, and untracked ones git does not ignore) to
   DIR/src and runs ``setup.py sdist`` there.
2. Every such file under csrc/ and sslfast/, and the build files, must be in the
   sdist (setuptools adds only the Python packages and the sources ext_modules
   names; MANIFEST.in adds the rest).
3. Builds a wheel from the sdist with this interpreter (``pip wheel
   --no-build-isolation``, CPU kernels only: ``SSLFAST_FORCE_CPU=1``, the CUDA
   sources are compiled by ``make test``'s in-place build), unpacks it, and in a fresh
   process whose working directory is outside the checkout imports sslfast from it:
   the extension must load and each C++ CPU kernel must agree with its reference.

Exits 1 on the first failure, saying which step failed.
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Files outside csrc/ and sslfast/ that building from the sdist needs.
BUILD_FILES = ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in")


def tree_files(root=ROOT):
    """The tree's files as a commit would hold them (tracked and not ignored)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                         check=True, capture_output=True, text=True).stdout
    return sorted(f for f in out.split("\0") if f and os.path.isfile(os.path.join(root, f)))


def needed_in_sdist(files):
    return [f for f in files if f in BUILD_FILES or f.split("/")[0] in ("csrc", "sslfast")]


def build_sdist(workdir, root=ROOT):
    """Copies the tree into workdir/src, builds its sdist into workdir/sdist; returns
    (the sdist's path, the files it lacks)."""
    files = tree_files(root)
    src = os.path.join(workdir, "src")
    for f in files:
        os.makedirs(os.path.dirname(os.path.join(src, f)), exist_ok=True)
        shutil.copy2(os.path.join(root, f), os.path.join(src, f))
    out = os.path.join(workdir, "sdist")
    env = {**os.environ, "SSLFAST_FORCE_CPU": "1"}
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", out], cwd=src, env=env,
                   check=True, capture_output=True, text=True)
    (path,) = glob.glob(os.path.join(out, "*.tar.gz"))
    with tarfile.open(path) as tar:
        # members are "<name>-<version>/<path>"
        held = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    return path, [f for f in needed_in_sdist(files) if f not in held]


# Run in the fresh process: sslfast from the unpacked wheel, each C++ kernel of the CPU
# against its reference backend.
SMOKE = r"""
import os, sys, torch
import sslfast
from sslfast.functional import augment, ema_, enqueue_
from sslfast.augment import sample_params, simclr_config

site = sys.argv[1]
assert os.path.dirname(sslfast.__file__) == os.path.join(site, "sslfast"), sslfast.__file__
assert sslfast.has_cpu_kernels(), "the wheel's extension did not load"
g = torch.Generator().manual_seed(0)

t, s = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
a, b = t.clone(), t.clone()
ema_([a], [s], 0.9, backend="cpu")
ema_([b], [s], 0.9, backend="reference")
torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

keys = torch.randn(3, 4, generator=g)
out = []
for backend in ("cpu", "reference"):
    queue, ptr = torch.zeros(8, 4), torch.tensor([6])
    enqueue_(queue, ptr, keys, normalize=True, backend=backend)
    out.append((queue, ptr))
torch.testing.assert_close(out[0], out[1], rtol=1e-6, atol=1e-6)

images = torch.randint(0, 256, (2, 3, 40, 48), dtype=torch.uint8, generator=g)
cfg = simclr_config(32)
params = sample_params(2, (40, 48), cfg, generator=g)
views = [augment(images, params, cfg, backend=b) for b in ("cpu", "reference")]
torch.testing.assert_close(views[0], views[1], rtol=0, atol=2e-3 / min(cfg.std))
print("sslfast", sslfast.__version__, "from the wheel: CPU kernels agree with the reference")
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="keep the sdist, wheel and unpacked wheel here "
                   "(emptied first); default: a temporary folder")
    a = p.parse_args(argv)
    workdir = a.workdir or tempfile.mkdtemp(prefix="sslfast-dist-")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    try:
        sdist, missing = build_sdist(workdir)
        if missing:
            print(f"dist-check: FAIL: the sdist lacks {', '.join(missing)} (MANIFEST.in)")
            return 1
        print(f"dist-check: {os.path.basename(sdist)} holds every file the build needs")
        wheels = os.path.join(workdir, "wheel")
        env = {**os.environ, "SSLFAST_FORCE_CPU": "1"}
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation",
                            "--no-deps", sdist, "-w", wheels], env=env, cwd=workdir)
        if r.returncode:
            print("dist-check: FAIL: no wheel could be built from the sdist")
            return 1
        (wheel,) = glob.glob(os.path.join(wheels, "*.whl"))
        site = os.path.join(workdir, "site")
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PYTHONPATH"] = site
        r = subprocess.run([sys.executable, "-c", SMOKE, site], env=env, cwd=workdir)
        if r.returncode:
            print(f"dist-check: FAIL: {os.path.basename(wheel)} does not work outside the "
                  "checkout")
            return 1
        print(f"dist-check: {os.path.basename(wheel)} built from the sdist and works")
        return 0
    finally:
        if not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
