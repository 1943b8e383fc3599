import importlib.util
import inspect
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


def _mend_triton_interpreter():
    """Triton 3.6 (the GPU machine's version, checked here by `make device-versions`)
    has an interpreter that turns a scalar into an index with int() of its 1-element
    array, which NumPy refuses (2.4.6 here: "only 0-dimensional arrays can be converted"):
    every kernel with a runtime loop bound fails in it, and so does every older Triton's.
    Triton 3.7 squeezes the array first; so does this mend, for the interpreter of
    Triton < 3.7 only (its patch hook takes a scope in 3.6, not in 3.4 and older)."""
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return
    import triton
    from triton.runtime import interpreter

    if tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 7):
        return
    patch_tensor = interpreter._patch_lang_tensor

    def index(self):
        return int(self.handle.data.squeeze())

    if len(inspect.signature(patch_tensor).parameters) == 1:  # Triton <= 3.4: (tensor)
        def patched(tensor):
            patch_tensor(tensor)
            tensor.__index__ = index
    else:  # (tensor, scope): the scope undoes the patch after the launch
        def patched(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", index)

    interpreter._patch_lang_tensor = patched


_mend_triton_interpreter()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """A test marked `triton` runs its Triton kernels on the GPU where there is one (so
    it is a GPU test, `-m cuda`), else under the interpreter; without triton, skipped."""
    gpu = torch.cuda.is_available()
    no_triton = pytest.mark.skip(reason="no triton") if importlib.util.find_spec("triton") is None else None
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("triton") is not None:
            if no_triton is not None:
                item.add_marker(no_triton)
            if gpu:
                item.add_marker(pytest.mark.cuda)
        if not gpu and "cuda" in item.keywords:
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _seed(request):
    """Every test starts from its own fixed seed (fresh random inputs per test)."""
    # crc32, not hash(): str hashes change with every process (PYTHONHASHSEED), and a
    # failure must reproduce.
    seed = zlib.crc32(request.node.nodeid.encode()) % (2**31)
    random.seed(seed)
    torch.manual_seed(seed)
    yield


@pytest.fixture(autouse=True)
def _cuda_emu(request):
    """A test marked cuda_emu runs the ops' CUDA code under the CPU emulator
    (tests/cuda_emu), its blocks and threads in an order shuffled with the test's seed."""
    if request.node.get_closest_marker("cuda_emu") is None:
        yield
        return
    from tests import cuda_emu

    with cuda_emu.emulate(seed=zlib.crc32(request.node.nodeid.encode()) | 1) as ops:
        yield ops


@pytest.fixture
def tf32():
    """torch's fp32 matmul precision set to TF32 for the test (the kernels follow it)."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch before 2.9: no torch.backends.cuda.matmul.fp32_precision")
    from sslfast.bench.harness import fp32_precision

    with fp32_precision("tf32"):
        yield
