"""enqueue_: the ring-buffer write of the MoCo queue (SEMANTICS.md §4)."""

import collections
import random

import pytest
import torch
import torch.nn.functional as F

from sslfast import _extension
from sslfast.functional import enqueue_
from sslfast.ops.enqueue import _enqueue_torch_
from sslfast.reference import enqueue_reference
from tests import cuda_emu
from tests.utils import (
    CUDA_KERNEL_DEVICES,
    KERNEL_DEVICES,
    assert_no_host_sync,
    run_without_extension,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _compiled(device):
    return _extension.has_cuda_kernels() if device == "cuda" else _extension.has_cpu_kernels()


def _fresh(size, dim, dtype, device, start=0):
    queue = torch.randn(size, dim, dtype=torch.float64).to(device=device, dtype=dtype)
    ptr = torch.tensor([start], dtype=torch.int64, device=device)
    return queue, ptr


def _run(backend, queue, ptr, keys, normalize=False):
    if backend == "torch":
        _enqueue_torch_(queue, ptr, keys, normalize)
    else:
        enqueue_(queue, ptr, keys, normalize, backend=backend)


def _backends(device):
    out = ["reference", "torch"]
    if _compiled(device):
        out.append(device)
    return out


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("size", [1, 7, 64])
def test_ring_matches_deque_model(device, size):
    """Over a long random sequence of batch sizes (0, N < K, N = K, N > K, N not
    dividing K) the queue read from ptr onwards is exactly the newest K rows in
    FIFO order, on every backend."""
    dim = 5
    rng = random.Random(size)
    for backend in _backends(device):
        queue, ptr = _fresh(size, dim, torch.float32, device)
        model = collections.deque(queue.cpu().unbind(0), maxlen=size)
        counter = 0
        for _ in range(40):
            n = rng.choice([0, 1, 2, 3, size - 1, size, size + 1, 2 * size + 3, rng.randrange(50)])
            n = max(n, 0)
            keys = torch.arange(counter, counter + n * dim, dtype=torch.float32).view(n, dim)
            counter += n * dim
            _run(backend, queue, ptr, keys.to(device))
            model.extend(keys.unbind(0))
            p = int(ptr)
            assert 0 <= p < size
            fifo = torch.cat([queue[p:], queue[:p]]).cpu()
            assert torch.equal(fifo, torch.stack(list(model))), backend


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_equals_reference(device, dtype, normalize):
    size, dim = 37, 70
    for n, start in [(5, 0), (20, 30), (37, 11), (100, 36)]:
        keys = (torch.randn(n, dim, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
        keys[0] = 0.0  # an all-zero row stays zero when normalized
        keys_before = keys.clone()
        queue, ptr = _fresh(size, dim, dtype, device, start)
        expected_q, expected_p = enqueue_reference(queue, ptr, keys, normalize)
        for backend in _backends(device):
            q, p = queue.clone(), ptr.clone()
            _run(backend, q, p, keys, normalize)
            assert int(p) == expected_p
            if normalize:
                # fp32 arithmetic, one rounding: within an ulp or two of the float64 definition
                tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3,
                       torch.float64: 1e-14}[dtype]
                torch.testing.assert_close(q.double(), expected_q.double(), rtol=tol, atol=1e-7)
            else:
                assert torch.equal(q, expected_q), backend
            assert torch.equal(keys, keys_before)  # inputs untouched


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_normalized_rows_are_unit(device):
    queue, ptr = _fresh(16, 33, torch.float32, device)
    keys = torch.randn(16, 33, device=device) * 100
    enqueue_(queue, ptr, keys, normalize=True)
    torch.testing.assert_close(queue, F.normalize(keys, dim=1), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_non_contiguous_keys(device):
    queue, ptr = _fresh(10, 6, torch.float32, device, 4)
    big = torch.randn(12, 7, device=device)
    keys = big[:, 1:][::2]  # strided rows and columns
    expected_q, expected_p = enqueue_reference(queue, ptr, keys)
    enqueue_(queue, ptr, keys)
    assert torch.equal(queue, expected_q) and int(ptr) == expected_p


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_keys_requiring_grad_are_detached(device):
    queue, ptr = _fresh(8, 4, torch.float32, device)
    keys = torch.randn(3, 4, device=device, requires_grad=True)
    enqueue_(queue, ptr, keys)
    assert not queue.requires_grad and torch.equal(queue[:3], keys.detach())


def _bad_inputs():
    q = torch.randn(8, 4)
    p = torch.zeros(1, dtype=torch.int64)
    k = torch.randn(3, 4)
    return [
        ((torch.randn(8), p, k), ValueError, "queue must be 2-D"),
        ((torch.randn(0, 4), p, k), ValueError, "queue has size 0"),
        ((q.t().contiguous().t(), p, k), ValueError, "queue must be contiguous"),
        ((q.to(torch.int32), p, k.to(torch.int32)), TypeError, "queue must be float"),
        ((q, p.to(torch.int32), k), TypeError, "ptr must be int64"),
        ((q, torch.zeros(2, dtype=torch.int64), k), ValueError, "ptr must have one element"),
        ((q, torch.tensor([8]), k), ValueError, r"ptr holds 8, outside \[0, 8\)"),
        ((q, torch.tensor([-1]), k), ValueError, "ptr holds -1"),
        ((q, p, torch.randn(3, 5)), ValueError, "keys has dimension 5 but queue has 4"),
        ((q, p, torch.randn(4)), ValueError, "keys must be 2-D"),
        ((q, p, k.double()), TypeError,
         "keys is (torch.float64|Double) but queue is (torch.float32|Float)"),
        ((q, p, q[2:5]), ValueError, "keys shares memory with queue"),
        ((q, p, "keys"), TypeError, "keys must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_input_names_the_argument(case, backend):
    args, exc, msg = _bad_inputs()[case]
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with pytest.raises(exc, match=msg):
        enqueue_(*args, backend=backend)
    after = [a for a in args if isinstance(a, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(after, before))  # nothing written


@pytest.mark.skipif(not _extension.has_cpu_kernels(), reason="needs the compiled extension")
@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_input_in_the_compiled_op(case):
    """Called directly as torch.ops.sslfast.enqueue_, the C++ checks name the argument."""
    args, exc, msg = _bad_inputs()[case]
    if any(not isinstance(a, torch.Tensor) for a in args):
        pytest.skip("the dispatcher rejects non-tensors itself")
    with pytest.raises(exc, match=msg):
        torch.ops.sslfast.enqueue_(*args, False)


@pytest.mark.cuda
def test_mixed_devices_are_rejected():
    q = torch.randn(8, 4, device="cuda")
    with pytest.raises(ValueError, match="ptr is on cpu but queue is on cuda"):
        enqueue_(q, torch.zeros(1, dtype=torch.int64), torch.randn(2, 4, device="cuda"))
    with pytest.raises(ValueError, match="keys is on cpu but queue is on cuda"):
        enqueue_(q, torch.zeros(1, dtype=torch.int64, device="cuda"), torch.randn(2, 4))


@pytest.mark.skipif(not _extension.has_cpu_kernels(), reason="needs the compiled extension")
def test_opcheck():
    queue, ptr = _fresh(9, 5, torch.float32, "cpu", 3)
    for n, normalize in [(4, False), (20, True)]:
        torch.library.opcheck(torch.ops.sslfast.enqueue_.default,
                              (queue.clone(), ptr.clone(), torch.randn(n, 5), normalize))


@pytest.mark.skipif(not _extension.has_cpu_kernels(), reason="needs the compiled extension")
@pytest.mark.parametrize("op", ["torch.ops", "wrapper"])
def test_torch_compile_fullgraph(op):
    """The op, and the public wrapper (its memory-overlap check reads storage pointers,
    which tracing has not: skipped there)."""
    queue, ptr = _fresh(9, 5, torch.float32, "cpu", 3)
    keys = torch.randn(4, 5)
    expected_q, expected_p = enqueue_reference(queue, ptr, keys, True)
    fn = torch.ops.sslfast.enqueue_ if op == "torch.ops" else enqueue_

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(q, p, k):
        fn(q, p, k, True)

    step(queue, ptr, keys)
    torch.testing.assert_close(queue, expected_q, rtol=1e-6, atol=1e-7)
    assert int(ptr) == expected_p


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
@pytest.mark.parametrize("n", [3, 5000, 70000])
def test_cuda_equals_cpu_large(n, device):
    """Many blocks (and the grid-stride loop past 1024 blocks); N > K wraps."""
    # Emulated (each warp shuffle a switch of 32 threads): a smaller queue, still past
    # 1024 blocks of 8 warps.
    size, dim, start = (65536, 128, 60000) if device == "cuda" else (9000, 40, 5000)
    for dtype in (torch.float32, torch.bfloat16):
        queue, ptr = _fresh(size, dim, dtype, "cpu", start)
        keys = torch.randn(n, dim).to(dtype)
        qc, pc = queue.to(device, copy=True), ptr.to(device, copy=True)
        with cuda_emu.native():
            enqueue_(queue, ptr, keys, normalize=True)
        enqueue_(qc, pc, keys.to(device), normalize=True)
        assert int(pc) == int(ptr)
        # the norm's sum is rounded in another order: an ulp of the result at most
        rtol = 2e-7 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(qc.cpu(), queue, rtol=rtol, atol=1e-7)


@pytest.mark.cuda_emu
def test_cuda_emu_same_bits_in_any_block_order():
    """The blocks read the start slot through the pointer's arrival counter and the
    last one stores the advanced pointer: the result, and the pointer (counter
    cleared), do not depend on the order the blocks run in."""
    size, dim = 300, 45
    keys = torch.randn(250, dim)
    results = []
    queue0, _ = _fresh(size, dim, torch.float32, "cpu")
    for seed in (0, 1, 2, 3):
        queue, ptr = queue0.clone(), torch.tensor([290])
        with cuda_emu.emulate(seed=seed) as ops:
            enqueue_(queue, ptr, keys, normalize=True)
            enqueue_(queue, ptr, keys[:7], normalize=True)
            assert ops._launches().count("_enqueue_fwd_kernel") == 2
        assert int(ptr) == (290 + 257) % size
        results.append(queue)
    assert all(torch.equal(q, results[0]) for q in results[1:])


@pytest.mark.cuda
def test_cuda_no_host_sync_and_graph_capture():
    """No host synchronization: the call passes under sync_debug_mode "error"
    and can be captured in a CUDA graph, whose replays advance the pointer."""
    size, dim, n = 100, 16, 30
    queue, ptr = _fresh(size, dim, torch.float32, "cuda", 95)
    keys = torch.randn(n, dim, device="cuda")
    assert_no_host_sync(lambda: enqueue_(queue, ptr, keys))
    expected_q, expected_p = queue.clone(), ptr.clone()
    g = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(g, stream=stream):
            enqueue_(queue, ptr, keys)
    torch.cuda.current_stream().wait_stream(stream)
    queue.copy_(expected_q)
    ptr.copy_(expected_p)
    for _ in range(7):
        keys.copy_(torch.randn(n, dim, device="cuda"))
        expected_q, expected_p = enqueue_reference(expected_q, expected_p, keys)
        g.replay()
        torch.cuda.synchronize()
        assert int(ptr) == expected_p
        assert torch.equal(queue, expected_q)


def test_fallback_without_extension():
    """Without the compiled extension enqueue_ runs the PyTorch fallback, warns once."""
    run_without_extension(
        """
        import warnings
        import torch
        import sslfast
        from sslfast.reference import enqueue_reference
        assert not sslfast.has_cpu_kernels()
        queue, ptr = torch.randn(10, 4), torch.tensor([8])
        keys = torch.randn(13, 4)
        exp_q, exp_p = enqueue_reference(queue, ptr, keys, True)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            sslfast.functional.enqueue_(queue, ptr, keys, normalize=True)
        assert sum("fallback" in str(x.message) for x in w) == 1
        torch.testing.assert_close(queue, exp_q, rtol=1e-6, atol=1e-7)
        assert int(ptr) == exp_p
        print("ok")
        """
    )
