"""Honest wall-clock timing: warm-up outside the measurement, CUDA synchronized before every
clock read, the median of repeated runs reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: str) -> None:
    """Wait for queued CUDA work, so a clock read after it measures the work, not the launch."""
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(
    fn: Callable[[], object], *, repeats: int, warmup: int = 1, device: str = "cpu"
) -> list[float]:
    """Seconds per call of ``fn`` over ``repeats`` timed calls after ``warmup`` untimed ones.

    Args:
        fn: the work to time (its result is discarded).
        repeats: number of timed calls (>= 1).
        warmup: untimed calls first (caches, allocator, lazy init, ORT graph optimization).
        device: ``"cuda"`` synchronizes before each clock read.

    Returns:
        The per-call durations in seconds.

    Raises:
        ValueError: ``repeats < 1`` or ``warmup < 0``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))
