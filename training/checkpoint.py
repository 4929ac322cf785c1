"""``checkpoint.pt``: the config, model, optimizer and loop state of a run, written atomically."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT = "checkpoint.pt"


@dataclass
class LoopState:
    """Where the loop is; saved in the checkpoint and restored on resume.

    Attributes:
        step: global optimizer steps done.
        epoch, batch_in_epoch: the data position.
        elapsed_s: training time (the budget clock).
        lr_scale: the NaN guard's learning-rate factor (halved per restore).
        nan_restarts: restores so far.
        images: training images seen, over all ranks.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    elapsed_s: float = 0.0
    lr_scale: float = 1.0
    nan_restarts: int = 0
    images: int = 0

    def advance(self, images: int, steps_per_epoch: int) -> bool:
        """Count one step of ``images``; True when it ended an epoch."""
        self.step += 1
        self.images += images
        self.batch_in_epoch += 1
        if self.batch_in_epoch == steps_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
            return True
        return False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopState:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file of a run folder (or the file itself).

    Raises:
        FileNotFoundError: no checkpoint there.
    """
    p = Path(path)
    p = p / CHECKPOINT if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p}")
    return p


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors on the CPU)."""
    return torch.load(resolve_checkpoint(path), map_location="cpu", weights_only=True)


def save_checkpoint(
    run_dir: Path,
    config: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: LoopState,
    average: dict[str, Any] | None = None,
) -> None:
    """Write ``run_dir/checkpoint.pt`` through a temporary file (never half-written).
    ``average``: the run's weight average (:class:`training.averaging.WeightAverage` state)."""
    path = run_dir / CHECKPOINT
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(
        dict(
            config=config,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            state=asdict(state),
            **({} if average is None else {"average": average}),
        ),
        tmp,
    )
    os.replace(tmp, path)
