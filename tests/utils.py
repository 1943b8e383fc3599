"""Shared test helpers: tolerances by dtype, parity assertions, device params,
subprocess and multi-process runners."""

import os

import pytest
import torch

# (rtol, atol) for a result stored in the given dtype, against a float64 reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (1e-2, 1e-3),
}

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# Ops with CUDA C++ kernels also run them on the CPU under the emulator of
# tests/cuda_emu: the test sees CPU tensors (device "cpu"), and tests/conftest.py
# routes torch.ops.sslfast.* to the emulated CUDA code for a test with this mark.
CUDA_EMU = pytest.param("cpu", marks=pytest.mark.cuda_emu, id="cuda_emu")
KERNEL_DEVICES = DEVICES + [CUDA_EMU]
# The CUDA kernels: on a GPU, and emulated.
CUDA_KERNEL_DEVICES = [DEVICES[1], CUDA_EMU]

# Where the Triton kernels run: the GPU, else CPU tensors under the interpreter (which
# tests/conftest.py chooses before triton is imported).
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
# The "triton" backend as a test parameter. The mark skips it without triton and makes
# it a GPU test (`-m cuda`) on a machine with a GPU (tests/conftest.py).
TRITON = pytest.param("triton", marks=pytest.mark.triton)


def device_for(backend):
    """Where a test's inputs for ``backend`` live: the Triton device for "triton"."""
    return TRITON_DEVICE if backend == "triton" else "cpu"


def assert_parity(actual, expected, dtype=None, what="result"):
    """actual (any dtype/device) equals the float64 expected within dtype's tolerance."""
    dtype = dtype if dtype is not None else actual.dtype
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.detach().to("cpu", torch.float64),
        expected.detach().to("cpu", torch.float64),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{what} ({dtype}): {m}",
    )


def random_tensor(shape, dtype, device, layout="contiguous"):
    """Random values in the given layout: contiguous, transposed (non-contiguous,
    dense), strided (non-dense: every other element) or channels_last."""
    if layout == "contiguous":
        return torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    if layout == "transposed":
        return random_tensor(tuple(reversed(shape)), dtype, device).transpose(0, -1)
    if layout == "strided":
        big = random_tensor((*shape[:-1], 2 * shape[-1]), dtype, device)
        return big[..., ::2]
    if layout == "channels_last":
        return random_tensor(shape, dtype, device).contiguous(memory_format=torch.channels_last)
    raise ValueError(layout)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_without_extension(code):
    """Runs a Python snippet in a fresh process with SSLFAST_NO_EXTENSION=1 (the
    package on its PyTorch fallbacks) and asserts it printed "ok"."""
    import subprocess
    import sys
    import textwrap

    env = dict(os.environ, SSLFAST_NO_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def spawn_gloo(worker, world, tmp_path):
    """Runs worker(rank, world, out_dir) in `world` processes that share a gloo
    process group (CPU); returns what each rank saved to out_dir/rank{r}.pt."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_entry, args=(worker, world, str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _gloo_entry(rank, worker, world, out_dir):
    import torch.distributed as dist

    from sslfast import distributed

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'init')}",
                            rank=rank, world_size=world)
    try:
        result = worker(rank, world)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    distributed.exit_process(0)  # not through finalization: see its docstring


def assert_no_host_sync(fn):
    """fn, once warmed up, runs under torch's sync debug mode "error" (CUDA)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
