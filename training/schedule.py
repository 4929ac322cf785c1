"""The budget: a training clock, when to stop, the learning rate, and when to log, evaluate and
checkpoint.

Time accounting (airbench style): the budget clock runs only while training; evaluation and
checkpoint writes pause it, and on CUDA the clock is read after a synchronize so queued kernels
are charged to training. The learning rate is :func:`training.loss.one_cycle_lr` of the elapsed
fraction of the budget (or of the step count with ``epochs``), so a budgeted run always ends with
a complete schedule.
"""

from __future__ import annotations

import collections
import math
import statistics
import time

import torch

from training.config import TrainConfig
from training.loss import one_cycle_lr

#: Training-metric lines in ``metrics.jsonl`` at most this often (training seconds).
LOG_EVERY_S = 10.0
#: Step times the stop rule takes the median of.
RECENT_STEPS = 7


class Stopwatch:
    """Training time: runs only between ``start`` and ``pause``; syncs CUDA before reading."""

    def __init__(self, device: torch.device, offset: float = 0.0) -> None:
        self.device, self.total, self.since = device, float(offset), None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self.since = time.perf_counter()

    def pause(self) -> None:
        self._sync()
        if self.since is not None:
            self.total += time.perf_counter() - self.since
        self.since = None

    def elapsed(self, sync: bool = False) -> float:
        if sync:
            self._sync()
        return self.total + (time.perf_counter() - self.since if self.since is not None else 0.0)


class StepTimer:
    """Training time per step, to stop before the budget ends.

    The median of the newest steps (robust to a slow guard/sync step), the first step (warm-up)
    left out.
    """

    def __init__(self) -> None:
        self.recent: collections.deque[float] = collections.deque(maxlen=RECENT_STEPS)
        self.step_time, self.prev, self.warm = 0.0, None, False

    def observe(self, elapsed: float) -> float:
        """Note the clock at the top of a step; returns ``elapsed``."""
        if self.prev is not None:  # training time per step (pauses are not in it)
            if self.warm:
                self.recent.append(elapsed - self.prev)
                self.step_time = statistics.median(self.recent)
            self.warm = True
        self.prev = elapsed
        return elapsed


class Schedule:
    """Where a run is in its schedule: the stop rule and the one-cycle learning rate.

    Args:
        cfg: the run's (resolved) configuration.
        steps_per_epoch: global steps in one epoch.
    """

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.cfg = cfg
        self.total_steps = None if cfg.epochs is None else cfg.epochs * steps_per_epoch

    def finished(self, elapsed: float, step: int, step_time: float) -> bool:
        """Budget: stop when half a step more would pass it; epochs: after the last step."""
        if self.cfg.budget_s is not None:
            return elapsed + 0.5 * step_time >= self.cfg.budget_s
        return step >= self.total_steps

    def fraction(self, elapsed: float, step: int) -> float:
        """The elapsed fraction of the budget (or of the steps)."""
        if self.cfg.budget_s is not None:
            return elapsed / self.cfg.budget_s
        return step / self.total_steps

    def set_lr(
        self, optimizer: torch.optim.Optimizer, elapsed: float, step: int, scale: float
    ) -> float:
        """Set and return the learning rate at this point, times the NaN guard's ``scale``."""
        cfg = self.cfg
        lr = one_cycle_lr(
            self.fraction(elapsed, step),
            cfg.peak_lr,
            warmup_frac=cfg.warmup_frac,
            div_factor=cfg.div_factor,
            final_div_factor=cfg.final_div_factor,
        )
        lr = lr * scale
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


class Cadence:
    """When to log, evaluate and checkpoint, in training seconds (and epochs for evaluation).

    Args:
        cfg: the run's configuration (``eval_every``, ``eval_every_s``, ``checkpoint_every_s``).
        start_s: the training time the run (re)starts at.
    """

    def __init__(self, cfg: TrainConfig, start_s: float) -> None:
        self.cfg = cfg
        self.last_log = self.last_checkpoint = start_s
        self.next_eval = start_s + cfg.eval_every_s if cfg.eval_every_s else math.inf

    def log_due(self, elapsed: float, epoch_done: bool) -> bool:
        """A ``train`` line is due (at most every :data:`LOG_EVERY_S`, and after each epoch)."""
        if elapsed - self.last_log >= LOG_EVERY_S or epoch_done:
            self.last_log = elapsed
            return True
        return False

    def eval_due(self, elapsed: float, epoch: int, epoch_done: bool) -> bool:
        """An evaluation is due; if so the next one is scheduled from ``elapsed``."""
        every = self.cfg.eval_every
        due = bool(epoch_done and every and epoch % every == 0) or elapsed >= self.next_eval
        if due:
            self.next_eval = elapsed + self.cfg.eval_every_s if self.cfg.eval_every_s else math.inf
        return due

    def checkpoint_due(self, elapsed: float) -> bool:
        """A checkpoint is due; if so the next one counts from ``elapsed``."""
        if elapsed - self.last_checkpoint >= self.cfg.checkpoint_every_s:
            self.last_checkpoint = elapsed
            return True
        return False
