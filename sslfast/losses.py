"""User-facing loss modules (lightly-compatible names and signatures)."""

from torch import nn

from sslfast.ops.clip import clip_loss
from sslfast.ops.info_nce import info_nce_loss
from sslfast.ops.ntxent import ntxent_loss


class NTXentLoss(nn.Module):
    """NT-Xent (SimCLR), as ``lightly.loss.NTXentLoss``, fused: no 2N x 2N logits.

    ``forward(out0, out1) -> scalar``. ``temperature`` may be a float or a 0-dim
    tensor (e.g. an ``nn.Parameter``), which then receives its gradient.
    """

    def __init__(self, temperature=0.5, memory_bank_size=0, gather_distributed=False,
                 backend="auto"):
        super().__init__()
        if isinstance(temperature, (int, float)) and abs(temperature) < 1e-8:
            raise ValueError(f"Illegal temperature: abs({temperature}) < 1e-8")
        size = memory_bank_size[0] if isinstance(memory_bank_size, (tuple, list)) else memory_bank_size
        if size:
            raise NotImplementedError(
                "NTXentLoss(memory_bank_size=...) is not available yet in sslfast (it arrives "
                "with the MoCo queue); use memory_bank_size=0, or info_nce_loss with a queue"
            )
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.backend = backend

    def forward(self, out0, out1):
        return ntxent_loss(out0, out1, self.temperature, self.gather_distributed, self.backend)


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
