"""A distributed sampler that can start mid-epoch (exact resume)."""

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler):
    """Each epoch a permutation of the dataset drawn from ``seed + epoch`` (the
    same on every rank), cut into full global batches (the remainder dropped);
    rank r takes its ``batch_size`` slice of every global batch.
    ``set_epoch(epoch, start_batch)`` skips the first ``start_batch`` batches."""

    def __init__(self, n, batch_size, rank=0, world_size=1, seed=0, shuffle=True):
        if n < batch_size * world_size:
            raise ValueError(f"the dataset has {n} images, fewer than one global batch of "
                             f"{batch_size * world_size}")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self):
        return self.n // (self.batch_size * self.world)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(
                self.seed + self.epoch))
        else:
            order = torch.arange(self.n)
        g = self.batch_size * self.world
        for b in range(self.start_batch, self.batches_per_epoch):
            lo = b * g + self.rank * self.batch_size
            yield from order[lo:lo + self.batch_size].tolist()

    def __len__(self):
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
