"""The training window: loss and accuracy summed on the device over the steps between two NaN
guard checks (read once per window: one sync), turned into ``train`` records."""

from __future__ import annotations

from typing import Any

import torch

from training.batches import TrainBatches
from training.checkpoint import LoopState
from training.schedule import Schedule


class TrainWindow:
    """Loss and accuracy summed on the device over the steps since the last guard check.

    Args:
        device: where the sums live (read once per window: one sync).
        schedule: for ``total_steps`` in the record.
        batches: for the batch sizes and ``steps_per_epoch``.
        start_s: the training time the window starts at.
    """

    def __init__(
        self, device: torch.device, schedule: Schedule, batches: TrainBatches, start_s: float
    ) -> None:
        self.schedule, self.batches = schedule, batches
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self.count, self.start = 0, start_s

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += loss.detach()
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.count += 1

    def record(self, state: LoopState, elapsed: float, lr: float | None = None) -> dict[str, Any]:
        """The window as a ``train`` record (``lr`` left out when None)."""
        b = self.batches
        record: dict[str, Any] = dict(
            step=state.step,
            epoch=state.step / b.steps_per_epoch,
            elapsed_s=elapsed,
            budget_s=self.schedule.cfg.budget_s,
            total_steps=self.schedule.total_steps,
        )
        if lr is not None:
            record["lr"] = lr
        record.update(
            loss=float(self.loss) / self.count,
            acc=float(self.correct) / (self.count * b.per_rank),
            images_per_s=self.count * b.per_rank * b.dist.world / max(1e-9, elapsed - self.start),
        )
        return record

    def reset(self, elapsed: float) -> None:
        self.loss.zero_()
        self.correct.zero_()
        self.count, self.start = 0, elapsed
