"""Weighted k-nearest-neighbour evaluation of a backbone (InstDisc, Wu et al. 2018).

The usual monitor of self-supervised training: features of the training set form
the bank, each test image votes over its ``k`` most cosine-similar bank entries
with weights ``exp(sim / t)``. With ``knn_accuracy(..., distributed=True)`` under
torch.distributed every rank takes part: each embeds a shard of the training set
and the whole test set, finds each test image's ``k`` nearest among its shard, and
the ranks' candidates are gathered and merged (the top ``k`` of the shards' top
``k`` are the top ``k``; only similarities tied across the ``k``-th place could pick
another neighbour than one process would).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sslfast import distributed as dist_helpers
from sslfast.augment.config import IMAGENET_MEAN, IMAGENET_STD
from sslfast.pretrain.data import decode_images, make_loader, stack_if_same_size


def knn_predict(
    feature: torch.Tensor,
    feature_bank: torch.Tensor,
    feature_labels: torch.Tensor,
    num_classes: int,
    knn_k: int = 200,
    knn_t: float = 0.1,
) -> torch.Tensor:
    """Classes ranked by weighted kNN vote, ``(B, num_classes)``, best first.

    ``feature`` is ``(B, D)`` and ``feature_bank`` ``(D, M)``, both L2-normalized along
    D; ``feature_labels`` is ``(M,)``. ``knn_k`` is clamped to ``M``. Same result as
    ``lightly.utils.benchmarking.knn_predict`` without its ``(B·k, C)`` one-hot
    tensor; votes are summed in float32 (``exp(1/t)`` overflows half precision).
    """
    if feature.dim() != 2 or feature_bank.dim() != 2:
        raise ValueError(
            f"feature must be (B, D) and feature_bank (D, M), got {tuple(feature.shape)} "
            f"and {tuple(feature_bank.shape)}"
        )
    if feature.shape[1] != feature_bank.shape[0]:
        raise ValueError(
            f"feature dim {feature.shape[1]} != feature_bank dim {feature_bank.shape[0]} "
            "(feature_bank is (D, M))"
        )
    if feature_labels.numel() != feature_bank.shape[1]:
        raise ValueError(
            f"feature_labels has {feature_labels.numel()} entries, feature_bank "
            f"{feature_bank.shape[1]} columns"
        )
    if feature_bank.shape[1] == 0:
        raise ValueError("feature_bank is empty")
    _check_vote(knn_k, knn_t, "knn_k", "knn_t")
    sim_weight, sim_labels = _nearest(feature, feature_bank, feature_labels, knn_k)
    return _vote(sim_weight, sim_labels, num_classes, knn_t)


def _check_vote(k, t, k_name, t_name):
    if k < 1:
        raise ValueError(f"{k_name} must be >= 1, got {k}")
    if t <= 0:
        raise ValueError(f"{t_name} must be > 0, got {t}")


def _nearest(feature, feature_bank, feature_labels, knn_k):
    """(similarities, labels) of each row's min(k, M) most similar bank entries."""
    k = min(int(knn_k), feature_bank.shape[1])
    sim = feature @ feature_bank  # (B, M)
    sim_weight, sim_indices = sim.topk(k, dim=1)  # (B, k)
    return sim_weight, feature_labels.to(sim_indices.device).reshape(-1)[sim_indices]


def _vote(sim_weight, sim_labels, num_classes, knn_t):
    """Classes ranked by the votes exp(sim / t) of the neighbours, best first."""
    weights = (sim_weight.float() / knn_t).exp()
    scores = torch.zeros(sim_weight.shape[0], num_classes, dtype=torch.float32,
                         device=sim_weight.device)
    scores.scatter_add_(1, sim_labels, weights)
    return scores.argsort(dim=1, descending=True)


def _nearest_over_ranks(feature, bank_t, bank_labels, knn_k):
    """_nearest over the union of every rank's bank shard (one process: its bank):
    each rank's k nearest (padded to k with -inf similarities, which vote 0 and sort
    last), gathered, and the k best of those. Collective under torch.distributed:
    every rank calls it with the same rows."""
    k = int(knn_k)
    sim, labels = _nearest(feature, bank_t, bank_labels, k)
    pad = k - sim.shape[1]
    sim = F.pad(sim.float(), (0, pad), value=float("-inf"))
    labels = F.pad(labels, (0, pad), value=0)
    sim_all = dist_helpers.gather_no_grad(sim[None])  # (W, B, k)
    labels_all = dist_helpers.gather_no_grad(labels[None])
    sim_all = sim_all.permute(1, 0, 2).reshape(feature.shape[0], -1)
    labels_all = labels_all.permute(1, 0, 2).reshape(feature.shape[0], -1)
    best, idx = sim_all.topk(k, dim=1)
    return best, labels_all.gather(1, idx)


def _prepare(images, image_size: int, mean: torch.Tensor, std: torch.Tensor, channels_last):
    """uint8 images (list or batch) → normalized float (B, 3, S, S)."""

    def resize(x):  # (B, 3, H, W) float: shorter side to S, then centre crop
        h, w = x.shape[-2:]
        if (h, w) == (image_size, image_size):
            return x
        scale = image_size / min(h, w)
        nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - image_size) // 2, (nw - image_size) // 2
        return x[..., top : top + image_size, left : left + image_size]

    batch = stack_if_same_size(images)
    if isinstance(batch, torch.Tensor):
        x = resize(batch.float())
    else:
        x = torch.cat([resize(img[None].float()) for img in batch])
    x = (x / 255.0 - mean) / std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def extract_features(
    backbone: nn.Module,
    dataset,
    device,
    image_size: int,
    batch_size: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channels_last: bool = False,
    autocast_dtype: torch.dtype | None = None,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalized float32 features ``(M, D)`` and int64 labels ``(M,)`` on ``device``.

    Images are decoded on ``device``, resized (shorter side to ``image_size``,
    antialiased bilinear, centre crop) where they differ from it, scaled to [0, 1]
    and normalized with ``mean``/``std``. The backbone runs in eval mode under
    ``no_grad`` and gets its training mode back afterwards; outputs are flattened.
    """
    device = torch.device(device)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    loader = make_loader(
        dataset, batch_size, shuffle=False, drop_last=False, num_workers=num_workers
    )
    feats, labels = [], []
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            for encoded, y in loader:
                x = _prepare(decode_images(encoded, device), image_size, mean_t, std_t,
                             channels_last)
                with torch.autocast(device.type, dtype=autocast_dtype,
                                    enabled=autocast_dtype is not None):
                    out = backbone(x)
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"backbone must return a tensor, got {type(out).__name__}")
                feats.append(F.normalize(out.flatten(1).float(), dim=1))
                labels.append(y.to(device))
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("dataset is empty")
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(
    backbone: nn.Module,
    train_set,
    test_set,
    device,
    image_size: int,
    k: int = 200,
    t: float = 0.1,
    batch_size: int = 256,
    distributed: bool = False,
    **feature_kw,
) -> float:
    """Top-1 accuracy in [0, 1] of weighted kNN on ``test_set`` with ``train_set`` as bank.
    ``feature_kw``: the rest of ``extract_features``'s options (mean, std, channels_last,
    autocast_dtype, num_workers).

    ``distributed=True`` under torch.distributed: collective, every rank returns the
    accuracy. Rank r embeds the training images r, r + W, ... (no padding, no
    duplicates) and the whole test set; the nearest neighbours are merged over the
    ranks. Every rank must hold the same network (BatchNorm buffers included)."""
    _check_vote(k, t, "k", "t")
    if len(train_set) == 0:
        raise ValueError("train_set is empty")
    kw = dict(batch_size=batch_size, **feature_kw)
    rank, world = (dist_helpers.rank(), dist_helpers.world_size()) if distributed else (0, 1)
    shard = train_set if world == 1 else torch.utils.data.Subset(
        train_set, range(rank, len(train_set), world))
    bank = extract_features(backbone, shard, device, image_size, **kw) if len(shard) else None
    test, test_labels = extract_features(backbone, test_set, device, image_size, **kw)
    # fewer training images than ranks: an empty bank of the features' D
    bank, bank_labels = bank or (test.new_empty(0, test.shape[1]), test_labels.new_empty(0))
    classes = getattr(train_set, "classes", None)
    top = torch.stack([bank_labels.max() if len(bank_labels) else test_labels.new_zeros(()),
                       test_labels.max()])
    if world > 1:
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
    num_classes = max(len(classes) if classes is not None else 0, int(top.max()) + 1)
    bank_t = bank.t().contiguous()
    correct = 0
    for lo in range(0, test.shape[0], batch_size):
        pred = _vote(*_nearest_over_ranks(test[lo : lo + batch_size], bank_t, bank_labels, k),
                     num_classes, t)
        correct += int((pred[:, 0] == test_labels[lo : lo + batch_size]).sum())
    return correct / test.shape[0]
