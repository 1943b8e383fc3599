"""The CUDA emulator (tests/cuda_emu) itself: it runs a correct kernel exactly and
reports the defects a GPU would punish (tests/cuda_emu/selftest_cuda.cu)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests import cuda_emu

THREADS = 128  # selftest_cuda.cu's block


def test_rewrite_keeps_line_numbers_and_leaves_no_cuda():
    """Every kernel file rewrites (error reports point at the .cu line)."""
    for cu in sorted((cuda_emu.ROOT / "csrc").glob("*/*_cuda.cu")):
        text = cu.read_text()
        out = cuda_emu.rewrite(text)
        assert out.count("\n") == text.count("\n"), cu
        assert "::cuda_emu::Launch(" in out, cu
    with pytest.raises(RuntimeError, match="no rewrite for"):
        cuda_emu.rewrite("__shared__ float a[4], b[4];")  # two declarators: not handled


@pytest.mark.cuda_emu
def test_block_reduction_with_shuffles_is_exact():
    x = torch.randint(-1000, 1000, (5000,)).float()  # integers: exact in any order
    assert float(cuda_emu.load()._selftest_sum(x)) == float(x.sum())


@pytest.mark.cuda_emu
@pytest.mark.parametrize("mode, arg", [(0, 1), (0, 16), (0, 7), (1, 1), (1, 5), (2, 3), (3, 9),
                                       (3, -1), (3, 40)])
def test_warp_shuffles_follow_cuda(mode, arg):
    """xor, down, up, indexed: a lane whose source is outside the warp keeps its
    value (down, up); an indexed source is taken modulo 32 (its low 5 bits)."""
    lane = torch.arange(32)
    src = [lane ^ arg, lane + arg, lane - arg, torch.full((32,), arg & 31)][mode]
    expected = torch.where((src >= 0) & (src < 32), src, lane).float()
    assert torch.equal(cuda_emu.load()._selftest_shuffle(torch.empty(0), mode, arg), expected)


@pytest.mark.cuda_emu
def test_three_dimensional_grids_and_blocks_cover_every_thread_once():
    out = cuda_emu.load()._selftest_index(torch.empty(0))
    assert torch.equal(out, torch.arange(len(out)))


def test_shared_memory_outside_a_function_body_is_refused():
    """static or namespace-scope __shared__ would keep one storage for every block."""
    for text in ("  static __shared__ float a[4];", "__shared__ int b;"):
        with pytest.raises(RuntimeError, match="no rewrite for"):
            cuda_emu.rewrite(text)


@pytest.mark.cuda_emu
def test_a_race_on_shared_memory_shows_in_the_schedule():
    """Without the barrier a thread may load its neighbour's slot before the
    neighbour stored it: it reads the fill (NaN), and which threads do depends on
    the order the threads run in."""
    ops = cuda_emu.load()
    x = torch.arange(float(THREADS))
    racy = []
    for seed in (0, 7):
        with cuda_emu.emulate(seed=seed):
            assert torch.equal(ops._selftest_neighbour(x, True), x.roll(-1))
            racy.append(ops._selftest_neighbour(x, False))
    assert racy[0].isnan().any()
    assert not torch.equal(racy[0].nan_to_num(-1), racy[1].nan_to_num(-1))


@pytest.mark.cuda_emu
def test_a_warp_may_run_ahead_of_another():
    """Between two __syncthreads one warp may finish a shuffle and read shared
    memory before another warp has stored to it: in some orders it reads the fill."""
    ops = cuda_emu.load()
    results = []
    for seed in range(9):
        with cuda_emu.emulate(seed=seed):
            results.append(ops._selftest_warp_ahead(torch.empty(0)))
    assert any(r.isnan().all() for r in results)  # warp 0 ahead
    assert any(torch.equal(r, torch.full((32,), 42.0)) for r in results)  # warp 1 ahead


@pytest.mark.cuda_emu
def test_syncthreads_after_some_threads_returned_is_an_error():
    ops = cuda_emu.load()
    like = torch.empty(0)
    assert torch.equal(ops._selftest_early_return(like, 0), torch.ones(THREADS))
    with pytest.raises(RuntimeError, match="__syncthreads reached by 118 threads while 10 returned"):
        ops._selftest_early_return(like, 10)


@pytest.mark.cuda_emu
def test_dynamic_shared_memory_limits():
    ops = cuda_emu.load()
    like = torch.empty(0)
    n = 48 * 1024 // 4 + 1  # one float above the default limit
    expected = float(np.cumsum(np.arange(n, dtype=np.float32), dtype=np.float32)[-1])
    with pytest.raises(RuntimeError, match="dynamic shared memory above 49152 bytes"):
        ops._selftest_dynamic_smem(like, n, False)
    assert float(ops._selftest_dynamic_smem(like, n, True)) == expected
    assert float(ops._selftest_dynamic_smem(like, n, False)) == expected  # the attribute stays
    with cuda_emu.emulate(optin_smem_bytes=cuda_emu.SM86_SMEM):
        with pytest.raises(RuntimeError, match="cudaFuncSetAttribute.* failed"):
            ops._selftest_dynamic_smem(like, cuda_emu.SM86_SMEM // 4 + 1, True)


@pytest.mark.cuda_emu
@pytest.mark.skipif(not cuda_emu.asan_preloaded(),
                    reason="AddressSanitizer not preloaded (make test runs these tests with it)")
@pytest.mark.parametrize("call, report", [
    ("_selftest_read_past(torch.ones(5))", "heap-buffer-overflow"),
    ("_selftest_stack_past(torch.ones(1), 4)", "stack-buffer-overflow"),  # after a barrier
])
def test_addresssanitizer_reports_an_access_past_a_tensor_or_a_local(call, report):
    ops = cuda_emu.load()
    assert float(ops._selftest_stack_past(torch.ones(1), 3)) == 0.0  # in bounds
    code = f"import torch; from tests import cuda_emu; cuda_emu.load().{call}"
    run = subprocess.run([sys.executable, "-c", code], cwd=cuda_emu.ROOT, env=dict(os.environ),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode != 0
    assert report in run.stderr and "selftest_cuda.cu" in run.stderr, run.stderr
