"""MemoryBank, MemoryBankModule, NTXentLoss(memory_bank_size=...) and the MoCo
shuffle helpers (SEMANTICS.md §2 and §4)."""

import pytest
import torch
import torch.nn.functional as F

import sslfast
from sslfast import distributed
from sslfast.functional import enqueue_, info_nce_loss
from sslfast.reference import info_nce_reference
from tests.utils import DEVICES, TRITON, TRITON_DEVICE, assert_no_host_sync, device_for, spawn_gloo

try:
    import lightly.loss
    from lightly.models.modules.memory_bank import MemoryBankModule as LightlyMemoryBankModule

    HAS_LIGHTLY = True
except ImportError:
    HAS_LIGHTLY = False
needs_lightly = pytest.mark.skipif(not HAS_LIGHTLY, reason="lightly not installed")


# ---- MemoryBank ------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_memory_bank_buffers_and_enqueue(device):
    bank = sslfast.MemoryBank(10, 6, device=device)
    assert bank.queue.shape == (10, 6) and bank.ptr.dtype == torch.int64
    torch.testing.assert_close(bank.queue.norm(dim=1), torch.ones(10, device=device))
    assert set(bank.state_dict()) == {"queue", "ptr"}
    assert not any(True for _ in bank.parameters())
    keys = torch.randn(4, 6, device=device, dtype=torch.float64, requires_grad=True) * 5
    bank.enqueue(keys)
    assert int(bank.ptr) == 4 and bank.queue.dtype == torch.float32
    torch.testing.assert_close(bank.queue[:4], F.normalize(keys.detach().float(), dim=1))
    assert bank.negatives().data_ptr() == bank.queue.data_ptr()  # no copy


def test_memory_bank_without_normalization_and_dtype():
    bank = sslfast.MemoryBank(5, 3, dtype=torch.bfloat16, normalize=False)
    keys = torch.randn(7, 3)
    bank.enqueue(keys)
    assert int(bank.ptr) == 2
    fifo = torch.cat([bank.queue[2:], bank.queue[:2]])
    assert torch.equal(fifo, keys[2:].to(torch.bfloat16))


def test_memory_bank_state_dict_round_trip_resumes_bit_identically():
    torch.manual_seed(0)
    a = sslfast.MemoryBank(50, 8)
    batches = [torch.randn(n, 8) for n in (7, 13, 40, 3, 64, 9, 21, 5)]
    for keys in batches[:4]:
        a.enqueue(keys)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    b = sslfast.MemoryBank(50, 8)  # another random queue, overwritten by the load
    b.load_state_dict(state)
    for keys in batches[4:]:
        a.enqueue(keys)
        b.enqueue(keys)
    assert torch.equal(a.queue, b.queue) and torch.equal(a.ptr, b.ptr)


def test_memory_bank_bad_input():
    with pytest.raises(ValueError, match="size must be positive"):
        sslfast.MemoryBank(0, 4)
    with pytest.raises(ValueError, match="dim must be positive"):
        sslfast.MemoryBank(4, 0)
    with pytest.raises(TypeError, match="size must be an int"):
        sslfast.MemoryBank(4.0, 2)
    bank = sslfast.MemoryBank(6, 4)
    with pytest.raises(ValueError, match="keys has dimension 5 but the queue holds 4-dim rows"):
        bank.enqueue(torch.randn(2, 5))
    with pytest.raises(ValueError, match="keys must be a 2-D tensor"):
        bank.enqueue(torch.randn(4))
    bad = bank.state_dict()
    bad["ptr"] = torch.tensor([6])
    with pytest.raises(ValueError, match=r"pointer holds 6, outside \[0, 6\)"):
        bank.load_state_dict(bad)


@pytest.mark.cuda
def test_memory_bank_device_mismatch():
    bank = sslfast.MemoryBank(6, 4, device="cuda")
    with pytest.raises(ValueError, match="keys is on cpu but the queue is on cuda"):
        bank.enqueue(torch.randn(2, 4))


# ---- the queue loss may run its backward after the enqueue --------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference", TRITON])
def test_queue_loss_backward_after_enqueue(backend):
    """MoCo's order: loss against the queue, enqueue (overwrites it), backward.
    The gradients are those against the queue as it was, with no clone."""
    n, d, k = 6, 16, 24
    dtype = torch.float32
    device = device_for(backend)
    q = torch.randn(n, d, dtype=dtype, device=device, requires_grad=True)
    key = torch.randn(n, d, dtype=dtype, device=device, requires_grad=True)
    t = torch.tensor(0.2, device=device, requires_grad=True)
    queue = F.normalize(torch.randn(k, d, device=device), dim=1)
    ptr = torch.zeros(1, dtype=torch.int64, device=device)
    old = queue.clone()
    loss = info_nce_loss(q, key, queue, t, backend=backend)
    enqueue_(queue, ptr, torch.randn(n, d, device=device), normalize=True)
    assert not torch.equal(queue, old)
    grads = torch.autograd.grad(loss, [q, key, t])
    q64, k64, t64 = (x.detach().cpu().double().requires_grad_() for x in (q, key, t))
    ref = info_nce_reference(q64, k64, old.cpu().double(), t64)
    ref_grads = torch.autograd.grad(ref, [q64, k64, t64])
    torch.testing.assert_close(loss.cpu().double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.cpu().double(), r, rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
def test_moco_step_makes_no_host_sync():
    """Loss against the queue, enqueue, backward: no host synchronization."""
    bank = sslfast.MemoryBank(4096, 64, device="cuda")
    q = torch.randn(256, 64, device="cuda", requires_grad=True)
    k = torch.randn(256, 64, device="cuda")

    def step():
        loss = info_nce_loss(q, k, bank.negatives(), 0.2)
        bank.enqueue(k)
        loss.backward()

    assert_no_host_sync(step)


# ---- lightly compatibility ---------------------------------------------------------------


@needs_lightly
def test_memory_bank_module_equals_lightly():
    """Same bank contents, same outputs and updates while no batch runs past the
    end (K a multiple of N); both return a copy taken before the update."""
    size, dim, n = 24, 5, 6
    for feature_dim_first in (True, False):
        ours = sslfast.MemoryBankModule((size, dim), feature_dim_first=feature_dim_first)
        theirs = LightlyMemoryBankModule((size, dim), feature_dim_first=feature_dim_first)
        ours.bank.copy_(theirs.bank)
        for step in range(9):
            out = torch.randn(n, dim)
            o1, b1 = ours(out, update=step % 3 != 2)
            o2, b2 = theirs(out, update=step % 3 != 2)
            assert o1 is out and torch.equal(b1, b2) and b1.shape == b2.shape
            assert b1.data_ptr() != ours.bank.data_ptr()
            assert torch.equal(ours.bank, theirs.bank)
            assert int(ours.bank_ptr) == int(theirs.bank_ptr)
    assert ours(torch.randn(2, dim))[1] is not None
    assert sslfast.MemoryBankModule(0)(out) == (out, None)


def test_memory_bank_module_wraps_where_lightly_truncates():
    ours = sslfast.MemoryBankModule((5, 2))
    keys = torch.arange(16.0).view(8, 2)
    ours(keys[:3], update=True)
    ours(keys[3:7], update=True)  # runs past the end: wraps
    assert int(ours.bank_ptr) == 2
    assert torch.equal(ours.bank, torch.stack([keys[5], keys[6], keys[2], keys[3], keys[4]]))


def test_memory_bank_module_int_size_and_state_dict():
    m = sslfast.MemoryBankModule(12, feature_dim_first=True)
    out, bank = m(torch.randn(4, 7), update=True)
    assert bank.shape == (7, 12) and int(m.bank_ptr) == 4
    fresh = sslfast.MemoryBankModule(12)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.bank, m.bank) and int(fresh.bank_ptr) == 4
    with pytest.raises(ValueError, match="illegal memory bank size"):
        sslfast.MemoryBankModule(-1)
    with pytest.raises(ValueError, match="illegal memory bank size"):
        sslfast.MemoryBankModule((4, 5, 6))


def test_memory_bank_module_int_size_puts_the_pointer_with_the_bank():
    # The bank is made on the first batch's device; the pointer must follow it there
    # (enqueue_ takes both on one device), as lightly's module needs no .to(device).
    m = sslfast.MemoryBankModule(12)
    m(torch.empty(4, 7, device="meta"))
    assert m.bank.device == m.bank_ptr.device == torch.device("meta")


@pytest.mark.cuda
def test_memory_bank_module_int_size_on_cuda_without_to():
    m = sslfast.MemoryBankModule(12)
    keys = torch.randn(4, 7, device="cuda")
    m(keys, update=True)
    _, bank = m(keys, update=False)
    assert int(m.bank_ptr) == 4 and bank.device.type == "cuda"
    assert torch.equal(bank.T[:4], keys)


@needs_lightly
@pytest.mark.parametrize("device, backend", [("cpu", "cpu"),
                                             pytest.param(TRITON_DEVICE, "triton", marks=pytest.mark.triton),
                                             pytest.param("cuda", "auto", marks=pytest.mark.cuda)])
def test_ntxent_memory_bank_equals_lightly(device, backend):
    """NTXentLoss(memory_bank_size=(K, D)): same loss and gradients as lightly's
    (on the CPU) over several steps, and the same bank afterwards (K a multiple of N)."""
    size, dim, n = 32, 16, 8
    ours = sslfast.NTXentLoss(0.2, memory_bank_size=(size, dim), backend=backend)
    theirs = lightly.loss.NTXentLoss(0.2, memory_bank_size=(size, dim))
    ours.memory_bank.queue.copy_(theirs.memory_bank.bank)
    for _ in range(6):
        a = torch.randn(n, dim)
        b = torch.randn(n, dim)
        a1 = a.clone().to(device).requires_grad_()
        b1 = b.clone().to(device).requires_grad_()
        a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
        l1, l2 = ours(a1, b1), theirs(a2, b2)
        l1.backward()
        l2.backward()
        torch.testing.assert_close(l1.cpu(), l2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a1.grad.cpu(), a2.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b1.grad.cpu(), b2.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.memory_bank.queue.cpu(), theirs.memory_bank.bank,
                                   rtol=1e-6, atol=1e-7)
        assert int(ours.memory_bank.ptr) == int(theirs.memory_bank.bank_ptr)
    # no update without gradient, as in lightly
    with torch.no_grad():
        ours(torch.randn(n, dim, device=device), torch.randn(n, dim, device=device))
    assert int(ours.memory_bank.ptr) == int(theirs.memory_bank.bank_ptr)


def test_ntxent_memory_bank_int_size_state_dict_and_errors():
    loss = sslfast.NTXentLoss(0.5, memory_bank_size=16)
    assert loss.memory_bank is None
    a = torch.randn(4, 8, requires_grad=True)
    loss(a, torch.randn(4, 8)).backward()
    assert loss.memory_bank.queue.shape == (16, 8) and int(loss.memory_bank.ptr) == 4
    fresh = sslfast.NTXentLoss(0.5, memory_bank_size=16)
    fresh.load_state_dict(loss.state_dict())
    assert torch.equal(fresh.memory_bank.queue, loss.memory_bank.queue)
    with pytest.raises(ValueError, match="query is 5-dim"):
        loss(torch.randn(4, 5), torch.randn(4, 5))
    with pytest.raises(ValueError, match="illegal memory bank size"):
        sslfast.NTXentLoss(memory_bank_size=-3)
    assert sslfast.NTXentLoss(memory_bank_size=0).memory_bank is None
    assert sslfast.NTXentLoss(memory_bank_size=(0, 128)).memory_bank is None


# ---- batch shuffle -----------------------------------------------------------------------


def test_batch_shuffle_round_trip_single_process():
    x = torch.randn(10, 3)
    shuffled, idx = distributed.batch_shuffle(x)
    assert not torch.equal(shuffled, x) and torch.equal(shuffled, x[idx])
    assert torch.equal(distributed.batch_unshuffle(shuffled, idx), x)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(distributed.batch_shuffle(x, generator=g1)[1],
                       distributed.batch_shuffle(x, generator=g2)[1])
    with pytest.raises(ValueError, match="shuffle indexes 9 rows but batch has 10"):
        distributed.batch_unshuffle(shuffled, idx[:9])


@needs_lightly
def test_batch_shuffle_interchangeable_with_lightly():
    from lightly.models.utils import batch_shuffle, batch_unshuffle

    x = torch.randn(7, 2)
    s, idx = distributed.batch_shuffle(x)
    assert torch.equal(batch_unshuffle(s, idx), x)
    s, idx = batch_shuffle(x)
    assert torch.equal(distributed.batch_unshuffle(s, idx), x)


# ---- distributed ---------------------------------------------------------------------------

N, D, K = 4, 6, 20


def _keys(world, step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(world * N, D, generator=g)


def _worker(rank, world):
    torch.manual_seed(7)  # the same initial queue on every rank
    bank = sslfast.MemoryBank(K, D, gather_distributed=True)
    loss_fn = sslfast.NTXentLoss(0.3, memory_bank_size=(K, D), gather_distributed=True)
    torch.manual_seed(11)
    losses = []
    for step in range(5):
        keys = _keys(world, step)
        mine = keys[rank * N:(rank + 1) * N]
        bank.enqueue(mine)
        a = (mine * 2).requires_grad_()
        losses.append(loss_fn(a, mine).detach())
    x = torch.arange(N * 3, dtype=torch.float32).view(N, 3) + 100 * rank
    shuffled, idx = distributed.batch_shuffle(x, distributed=True)
    back = distributed.batch_unshuffle(shuffled, idx, distributed=True)
    return {"queue": bank.queue, "ptr": bank.ptr, "loss_queue": loss_fn.memory_bank.queue,
            "losses": torch.stack(losses), "x": x, "shuffled": shuffled, "back": back}


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_queues_identical_and_shuffle_round_trips(world, tmp_path):
    res = spawn_gloo(_worker, world, tmp_path)
    torch.manual_seed(7)
    single = sslfast.MemoryBank(K, D)  # one process fed the concatenated keys
    for step in range(5):
        single.enqueue(_keys(world, step))
    for r in res:
        assert torch.equal(r["queue"], single.queue) and torch.equal(r["ptr"], single.ptr)
        assert torch.equal(r["loss_queue"], res[0]["loss_queue"])
        assert torch.equal(r["back"], r["x"])  # round trip
    # the shuffle moved rows across ranks and kept every row exactly once
    all_x = torch.cat([r["x"] for r in res])
    all_s = torch.cat([r["shuffled"] for r in res])
    assert not torch.equal(all_s, all_x)
    assert torch.equal(all_s.sort(dim=0).values, all_x.sort(dim=0).values)
