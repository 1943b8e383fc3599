"""The MoCo queue as modules, over the fused ``enqueue_`` op (SEMANTICS.md §4).

``MemoryBank`` is sslfast's own: a ring buffer whose pointer stays on the
device, read by the losses in place (no copy per step). ``MemoryBankModule`` is
a drop-in for ``lightly.models.modules.MemoryBankModule``: the same constructor,
``forward(output, labels=None, update=False) -> (output, bank)`` contract and
shapes, with two documented differences:

- a batch that runs past the end of the buffer wraps around to the start
  (lightly writes the part that fits and drops the rest, then restarts at 0);
- ``bank`` and ``bank_ptr`` are persistent buffers (in ``state_dict``), so a
  checkpoint resumes with the same queue.
"""

import torch
import torch.nn.functional as F
from torch import nn

from sslfast import distributed
from sslfast.ops.enqueue import enqueue_


def _random_unit_rows(size, dim, dtype, device=None):
    """MoCo's initial queue: Gaussian rows scaled to unit length."""
    rows = torch.randn(size, dim, device=device)
    return F.normalize(rows, dim=1).to(dtype)


def _check_ptr(ptr, size, where):
    value = int(ptr.reshape(()))
    if not 0 <= value < size:
        raise ValueError(f"{where}: the loaded pointer holds {value}, outside [0, {size})")


class MemoryBank(nn.Module):
    """A ring buffer of ``size`` keys of dimension ``dim`` (MoCo's queue).

    Buffers (both in ``state_dict``): ``queue`` (size, dim), initialized with
    random unit rows, and ``ptr``, a one-element int64 tensor holding the next
    slot. ``enqueue(keys)`` writes the keys (normalized first when
    ``normalize``) with one fused kernel and no host synchronization;
    ``negatives()`` is the queue itself, without a copy.

    The losses of sslfast (``info_nce_loss`` with a queue, ``NTXentLoss`` with a
    memory bank) compute their gradient in the forward and do not keep the
    queue, so the usual MoCo order — loss against the queue, then ``enqueue`` —
    needs no clone even when ``backward`` comes after the enqueue.

    With ``gather_distributed=True`` under ``torch.distributed`` the keys of
    all ranks (equal batch sizes) are all-gathered, in rank order and without
    gradient, before the write, so every rank holds the same queue.
    """

    def __init__(self, size, dim, dtype=torch.float32, gather_distributed=False, normalize=True,
                 device=None):
        super().__init__()
        for name, v in (("size", size), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"MemoryBank: {name} must be an int, got {type(v).__name__}")
            if v <= 0:
                raise ValueError(f"MemoryBank: {name} must be positive, got {v}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"MemoryBank: dtype must be a floating dtype, got {dtype}")
        self.gather_distributed = gather_distributed
        self.normalize = normalize
        self.register_buffer("queue", _random_unit_rows(size, dim, dtype, device))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.int64, device=device))
        self.register_load_state_dict_post_hook(MemoryBank._after_load)

    @property
    def size(self):
        return self.queue.shape[0]

    @property
    def dim(self):
        return self.queue.shape[1]

    @torch.no_grad()
    def enqueue(self, keys):
        """Writes ``keys`` (N, dim) at the pointer, wrapping around, and advances
        it. Keys are cast to the queue's dtype; they must be on its device."""
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2:
            raise ValueError(f"MemoryBank.enqueue: keys must be a 2-D tensor (batch, dim), got "
                             f"{getattr(keys, 'shape', type(keys).__name__)}")
        if keys.shape[1] != self.dim:
            raise ValueError(f"MemoryBank.enqueue: keys has dimension {keys.shape[1]} but the "
                             f"queue holds {self.dim}-dim rows")
        if keys.device != self.queue.device:
            raise ValueError(f"MemoryBank.enqueue: keys is on {keys.device} but the queue is on "
                             f"{self.queue.device}")
        if self.gather_distributed and distributed.world_size() > 1:
            keys = distributed.gather_no_grad(keys.detach())
        enqueue_(self.queue, self.ptr, keys.detach().to(self.queue.dtype),
                 normalize=self.normalize)

    def negatives(self):
        """The queue (size, dim), detached. It is the buffer itself: ``enqueue``
        overwrites it in place."""
        return self.queue.detach()

    def forward(self, keys):
        """Same as ``enqueue``."""
        self.enqueue(keys)

    @staticmethod
    def _after_load(module, incompatible):
        _check_ptr(module.ptr, module.size, "MemoryBank.load_state_dict")

    def extra_repr(self):
        return (f"size={self.size}, dim={self.dim}, dtype={self.queue.dtype}, "
                f"normalize={self.normalize}, gather_distributed={self.gather_distributed}")


def parse_bank_size(size, where):
    """(K, D or None) from lightly's ``size``: an int K (the dimension taken from
    the first batch) or a (K, D) pair; K = 0 disables the bank."""
    if isinstance(size, bool):
        raise TypeError(f"{where}: size must be an int or a (size, dim) pair, got a bool")
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"{where}: illegal memory bank size {size}, must be non-negative")
        return size, None
    try:
        parts = tuple(size)
    except TypeError:
        raise TypeError(f"{where}: size must be an int or a (size, dim) pair, got "
                        f"{type(size).__name__}") from None
    if any(isinstance(x, bool) or not isinstance(x, int) for x in parts):
        raise TypeError(f"{where}: size must hold ints, got {size!r}")
    if any(x < 0 for x in parts):
        raise ValueError(f"{where}: illegal memory bank size {size}, all entries must be "
                         "non-negative")
    if parts == (0,) or (len(parts) == 2 and parts[0] == 0):
        return 0, None
    if len(parts) != 2 or parts[1] == 0:
        raise ValueError(f"{where}: illegal memory bank size {size}, expected (size, dim) with "
                         "dim > 0, an int size, or 0 to disable the bank")
    return parts[0], parts[1]


class MemoryBankModule(nn.Module):
    """Drop-in for ``lightly.models.modules.MemoryBankModule``.

    ``size``: an int K (the feature dimension is taken from the first batch,
    as lightly < 1.6 did), a (K, D) pair, or 0 to disable the bank.
    ``forward(output, labels=None, update=False)`` returns ``(output, bank)``:
    ``bank`` is a copy of the memory bank taken before the update, (D, K) with
    ``feature_dim_first`` else (K, D), or None when the bank is disabled. With
    ``update`` the output rows (detached) are enqueued afterwards, gathered
    from all ranks first with ``gather_distributed``.

    The copy is what lightly returns and what makes the module a safe drop-in;
    ``MemoryBank`` with sslfast's losses avoids it.
    """

    def __init__(self, size=65536, gather_distributed=False, feature_dim_first=True):
        super().__init__()
        self.size, dim = parse_bank_size(size, "MemoryBankModule")
        self.gather_distributed = gather_distributed
        self.feature_dim_first = feature_dim_first
        shape = (self.size, dim) if dim else (0, 0)
        self.register_buffer("bank", torch.empty(shape))
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.int64))
        if self.size and dim:
            self.bank.copy_(_random_unit_rows(self.size, dim, torch.float32))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        loaded = state_dict.get(prefix + "bank")
        if loaded is not None and self.bank.numel() == 0 and loaded.dim() == 2:
            if loaded.shape[0] != self.size:
                raise ValueError(f"MemoryBankModule.load_state_dict: the bank has "
                                 f"{loaded.shape[0]} rows but size is {self.size}")
            self.bank = torch.empty(loaded.shape, dtype=loaded.dtype, device=self.bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.size and self.bank.numel():
            _check_ptr(self.bank_ptr, self.size, "MemoryBankModule.load_state_dict")

    def forward(self, output, labels=None, update=False):
        if self.size == 0:
            return output, None
        if not isinstance(output, torch.Tensor) or output.dim() != 2:
            raise ValueError(f"MemoryBankModule: output must be a 2-D tensor (batch, dim), got "
                             f"{getattr(output, 'shape', type(output).__name__)}")
        if self.bank.numel() == 0:  # an int size: the dimension comes with the first batch
            self.bank = _random_unit_rows(self.size, output.shape[1], torch.float32,
                                          output.device)
            self.bank_ptr = self.bank_ptr.to(output.device)  # enqueue_ wants both on one device
        bank = self.bank.clone().detach()
        if self.feature_dim_first:
            bank = bank.transpose(0, -1)
        if update:
            self._dequeue_and_enqueue(output)
        return output, bank

    @torch.no_grad()
    def _dequeue_and_enqueue(self, batch):
        if batch.shape[1] != self.bank.shape[1]:
            raise ValueError(f"MemoryBankModule: output has dimension {batch.shape[1]} but the "
                             f"bank holds {self.bank.shape[1]}-dim rows")
        if self.gather_distributed and distributed.world_size() > 1:
            batch = distributed.gather_no_grad(batch.detach())
        # Like lightly's slice assignment: any device and dtype, copied to the bank's.
        enqueue_(self.bank, self.bank_ptr, batch.detach().to(self.bank.device, self.bank.dtype))
