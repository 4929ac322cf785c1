"""This rank's training batches: the data in memory on the device, a seeded order per epoch,
batched augmentation (no per-sample Python in the hot loop)."""

from __future__ import annotations

import torch

from data import AUGMENTATIONS, Dataset, augment
from training.config import TrainConfig
from training.distributed import Dist


def epoch_order(
    seed: int, n: int, per_rank: int, world: int, rank: int
) -> torch.Tensor:
    """This rank's sample indices for one epoch: ``(steps_per_epoch, per_rank)``.

    Args:
        seed: the epoch's seed (:meth:`TrainConfig.order_seed`): the same on every rank and on
            resume, so the ranks split one permutation.
    """
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    steps = n // (per_rank * world)
    return perm[: steps * per_rank * world].view(steps, world, per_rank)[:, rank]


class TrainBatches:
    """The training split on ``device`` and this rank's share of each global batch.

    Args:
        data: the dataset.
        cfg: the resolved config (``batch_size`` set).
        dist: this process in the job.
        device: where the data and the augmentation live.
        start_step: the step the run (re)starts at (seeds the augmentation stream).
    """

    def __init__(
        self, data: Dataset, cfg: TrainConfig, dist: Dist, device: torch.device, start_step: int
    ) -> None:
        self.cfg, self.dist, self.device = cfg, dist, device
        self.images = data.train_images.to(device)  # (N, C, H, W) uint8
        self.labels = data.train_labels.to(device)
        n = len(self.images)
        self.per_rank = max(1, min(cfg.batch_size, n) // dist.world)
        self.steps_per_epoch = max(1, n // (self.per_rank * dist.world))
        self.spec = AUGMENTATIONS[cfg.dataset]
        self.generator = torch.Generator(device=device).manual_seed(
            cfg.augment_seed(dist.rank, start_step)
        )
        self.order: torch.Tensor | None = None

    @property
    def global_batch(self) -> int:
        """Images in one step over all ranks."""
        return self.per_rank * self.dist.world

    def get(self, epoch: int, batch_in_epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``batch_in_epoch`` of ``epoch``: images ``(B, C, H, W)`` in [0, 1] and labels."""
        if self.order is None or batch_in_epoch == 0:
            self.order = epoch_order(
                self.cfg.order_seed(epoch),
                len(self.images),
                self.per_rank,
                self.dist.world,
                self.dist.rank,
            ).to(self.device)
        idx = self.order[batch_in_epoch]
        x = augment(self.images[idx], self.spec, self.generator).float().div_(255)
        return x, self.labels[idx]
