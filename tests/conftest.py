import os
import random

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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    """Every test starts from its own fixed seed (fresh random inputs per test)."""
    seed = abs(hash(request.node.nodeid)) % (2**31)
    random.seed(seed)
    torch.manual_seed(seed)
    yield
