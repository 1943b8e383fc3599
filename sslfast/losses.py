"""User-facing loss modules (lightly-compatible names and signatures)."""

from torch import nn

from sslfast.modules.memory_bank import MemoryBank, parse_bank_size
from sslfast.ops._contrastive import check_features
from sslfast.ops.clip import clip_loss
from sslfast.ops.info_nce import info_nce_loss
from sslfast.ops.ntxent import ntxent_loss


class NTXentLoss(nn.Module):
    """NT-Xent (SimCLR), as ``lightly.loss.NTXentLoss``, fused: no 2N x 2N logits.

    ``forward(out0, out1) -> scalar``. ``temperature`` may be a float or a 0-dim
    tensor (e.g. an ``nn.Parameter``), which then receives its gradient.

    ``memory_bank_size`` > 0 (an int K, the dimension taken from the first
    batch, or a (K, D) pair) is lightly's MoCo mode: the loss of out0 against
    [its own out1 | the K keys of the bank] (label 0), computed by the fused
    queue kernel, then — when out0 requires grad, as in lightly — the normalized
    out1 rows enqueued (fused, no host sync; gathered from all ranks with
    ``gather_distributed``). The bank is a ``MemoryBank`` (float32, in
    ``state_dict``) at ``self.memory_bank``; where lightly truncates a batch at
    the end of the buffer, it wraps around.
    """

    def __init__(self, temperature=0.5, memory_bank_size=0, gather_distributed=False,
                 backend="auto"):
        super().__init__()
        if isinstance(temperature, (int, float)) and abs(temperature) < 1e-8:
            raise ValueError(f"Illegal temperature: abs({temperature}) < 1e-8")
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.backend = backend
        self.bank_size, dim = parse_bank_size(memory_bank_size, "NTXentLoss(memory_bank_size)")
        self.memory_bank = None
        if self.bank_size and dim:
            self.memory_bank = self._new_bank(dim)

    def _new_bank(self, dim, device=None):
        return MemoryBank(self.bank_size, dim, gather_distributed=self.gather_distributed,
                          normalize=True, device=device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # An int size makes the bank at the first batch: a checkpoint brings it earlier.
        queue = state_dict.get(prefix + "memory_bank.queue")
        if self.bank_size and self.memory_bank is None and queue is not None and queue.dim() == 2:
            self.memory_bank = self._new_bank(queue.shape[1])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, out0, out1):
        if not self.bank_size:
            return ntxent_loss(out0, out1, self.temperature, self.gather_distributed, self.backend)
        if self.memory_bank is None:
            check_features(out1, "out1")
            self.memory_bank = self._new_bank(out1.shape[1], out1.device)
        elif self.memory_bank.queue.device != out1.device:
            self.memory_bank.to(out1.device)  # once, instead of a copy per step
        loss = info_nce_loss(out0, out1, self.memory_bank.negatives(), self.temperature,
                             normalize=True, backend=self.backend)
        if out0.requires_grad:
            # Safe before backward: the queue loss does not keep the queue.
            self.memory_bank.enqueue(out1.detach())
        return loss


class InfoNCELoss(nn.Module):
    """InfoNCE: ``forward(query, key, queue=None, labels=None)``.

    With a queue of negatives (K, D) it is MoCo v1/v2's loss; without, the keys
    (gathered from all ranks with ``gather_distributed``) are the candidates
    and labels default to the matching rows (MoCo v3).
    """

    def __init__(self, temperature=0.07, normalize=True, gather_distributed=False,
                 feature_dim_first=False, backend="auto"):
        super().__init__()
        self.temperature = temperature
        self.normalize = normalize
        self.gather_distributed = gather_distributed
        self.feature_dim_first = feature_dim_first
        self.backend = backend

    def forward(self, query, key, queue=None, labels=None):
        return info_nce_loss(query, key, queue, self.temperature, labels, self.normalize,
                             self.gather_distributed, self.backend, self.feature_dim_first)


class CLIPLoss(nn.Module):
    """CLIP's symmetric loss (open_clip ``ClipLoss``):
    ``forward(image_features, text_features, logit_scale)``, logit_scale already
    exponentiated."""

    def __init__(self, gather_distributed=False, backend="auto"):
        super().__init__()
        self.gather_distributed = gather_distributed
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale):
        return clip_loss(image_features, text_features, logit_scale, self.gather_distributed,
                         self.backend)
