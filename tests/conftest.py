import os
import random
import zlib

# The Triton interpreter must be chosen before triton is imported anywhere.
try:
    import torch as _torch

    _HAS_GPU = _torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_GPU = False
if not _HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests run one fixed Triton config per kernel (results must not depend on it); the
# benchmarks autotune. Without this every new D and dtype would autotune on a GPU.
os.environ.setdefault("SSLFAST_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# On a GPU machine these run their Triton kernels on the GPU (else under the
# interpreter on the CPU): there they belong to the GPU tests (`pytest -m cuda`).
_TRITON_FILES = ("test_dot_lse_kernels.py", "test_dot_lse_pair_kernels.py")


def _runs_triton(item):
    path = item.nodeid.split("::")[0]
    if path.endswith("test_kernels_compile.py"):  # the ahead-of-time compile: no GPU
        return False
    return path.endswith(_TRITON_FILES) or "triton" in item.nodeid.lower()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        for item in items:
            if _runs_triton(item):
                item.add_marker(pytest.mark.cuda)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    """Every test starts from its own fixed seed (fresh random inputs per test)."""
    # crc32, not hash(): str hashes change with every process (PYTHONHASHSEED), and a
    # failure must reproduce.
    seed = zlib.crc32(request.node.nodeid.encode()) % (2**31)
    random.seed(seed)
    torch.manual_seed(seed)
    yield
