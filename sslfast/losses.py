"""User-facing loss modules (lightly-compatible names and signatures)."""

import torch
import torch.nn.functional as F
from torch import nn

from sslfast import distributed
from sslfast.modules.memory_bank import MemoryBank, parse_bank_size
from sslfast.ops._contrastive import check_features, check_same_shape
from sslfast.ops.clip import clip_loss
from sslfast.ops.dino import dino_loss
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


def _cosine(x0, x1, dim, eps, where):
    for name, x in (("x0", x0), ("x1", x1)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{where}: {name} must be a floating-point tensor")
        if x.numel() == 0:
            raise ValueError(f"{where}: {name} is empty (shape {tuple(x.shape)})")
    check_same_shape(x0, f"{where}: x0", x1, f"{where}: x1")
    if x0.device != x1.device:
        raise ValueError(f"{where}: x0 is on {x0.device} but x1 is on {x1.device}")
    return F.cosine_similarity(x0, x1, dim, eps)


class NegativeCosineSimilarity(nn.Module):
    """SimSiam's loss, as ``lightly.loss.NegativeCosineSimilarity``:
    ``-mean(cos(x0, x1))`` along ``dim``. Stop-gradient is the caller's
    (pass ``z.detach()``)."""

    def __init__(self, dim=1, eps=1e-8):
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x0, x1):
        return -_cosine(x0, x1, self.dim, self.eps, "NegativeCosineSimilarity").mean()


class BYOLLoss(nn.Module):
    """BYOL's form of the same loss: ``mean(2 - 2 cos(p, z))`` (the squared
    distance of the normalized vectors); the target ``z`` is detached here."""

    def __init__(self, dim=1, eps=1e-8):
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, p, z):
        return (2 - 2 * _cosine(p, z.detach(), self.dim, self.eps, "BYOLLoss")).mean()


class DINOLoss(nn.Module):
    """DINO's loss, as ``lightly.loss.DINOLoss`` (1.6), fused: no softmax or log-softmax
    tensors, no per-pair products (``sslfast.functional.dino_loss``).

    ``forward(teacher_out, student_out, teacher_temp=None, epoch=None) -> scalar``
    (lists of (N, output_dim) crops). The teacher temperature is ``teacher_temp`` when
    given, else the warmup schedule's value at ``epoch`` (linear from
    ``warmup_teacher_temp`` to ``teacher_temp`` over ``warmup_teacher_temp_epochs``),
    else ``teacher_temp``. After the loss, the ``center`` buffer ((1, 1, output_dim) as
    lightly's, so state dicts interchange) moves by EMA towards the mean of the teacher
    outputs over crops and batch, computed in float32 and averaged over ranks under
    torch.distributed. The teacher outputs get no gradient (DINO's teacher is an EMA
    model run under no_grad).
    """

    def __init__(self, output_dim=65536, warmup_teacher_temp=0.04, teacher_temp=0.04,
                 warmup_teacher_temp_epochs=30, student_temp=0.1, center_momentum=0.9,
                 center_mode="mean", backend="auto"):
        super().__init__()
        if center_mode != "mean":
            raise ValueError(f"Unknown center_mode {center_mode!r}; valid modes are ['mean']")
        if isinstance(output_dim, bool) or not isinstance(output_dim, int) or output_dim < 1:
            raise ValueError(f"output_dim must be a positive int, got {output_dim!r}")
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.teacher_temp_schedule = torch.linspace(warmup_teacher_temp, teacher_temp,
                                                    warmup_teacher_temp_epochs)
        self.backend = backend
        self.register_buffer("center", torch.zeros(1, 1, output_dim))

    def forward(self, teacher_out, student_out, teacher_temp=None, epoch=None):
        if teacher_temp is None:
            teacher_temp = self.teacher_temp
            if epoch is not None and epoch < self.warmup_teacher_temp_epochs:
                # a Python float: no copy of the CPU schedule to the GPU
                teacher_temp = float(self.teacher_temp_schedule[epoch])
        first = teacher_out[0] if isinstance(teacher_out, (list, tuple)) and teacher_out else None
        if isinstance(first, torch.Tensor) and first.dim() in (2, 3) \
                and first.shape[-1] != self.center.shape[-1]:
            raise ValueError(f"teacher_out[0] has dimension {first.shape[-1]} but this DINOLoss "
                             f"has output_dim={self.center.shape[-1]}")
        loss = dino_loss(teacher_out, student_out, self.center, teacher_temp, self.student_temp,
                         self.backend)
        self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out):
        """center <- m * center + (1 - m) * (mean of the teacher outputs over crops and
        batch, and over ranks). teacher_out: a list of (N, K) tensors or one (..., K)."""
        crops = [teacher_out] if isinstance(teacher_out, torch.Tensor) else list(teacher_out)
        k = self.center.shape[-1]
        total = sum(x.reshape(-1, k).sum(dim=0, dtype=torch.float32) for x in crops)
        batch_center = total / sum(x.numel() // k for x in crops)
        if distributed.is_distributed():
            torch.distributed.all_reduce(batch_center)
            batch_center = batch_center / distributed.world_size()
        m = self.center_momentum
        # Replaced, not updated in place: dino_loss saved the old center for the backward.
        self.center = (self.center * m + batch_center.view_as(self.center) * (1 - m)).to(
            self.center.dtype)
