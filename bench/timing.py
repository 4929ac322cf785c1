"""Honest wall-clock timing: warm-up outside the measurement, CUDA synchronized before every
clock read, the median of repeated runs reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch

K = TypeVar("K")


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


def time_round_robin(
    fns: Mapping[K, Callable[[], object]], *, repeats: int, warmup: int = 1, device: str = "cpu"
) -> dict[K, list[float]]:
    """Seconds per call of every ``fns`` entry, timed in turns: each round calls each one once.

    On a shared machine the load drifts over minutes; timing one function after another lets
    that drift land on some functions and not others, so their ratios move. Taking turns puts
    every function under the same load history, which is what a ratio needs.

    Raises:
        ValueError: ``repeats < 1`` or ``warmup < 0``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for fn in fns.values():
        time_call(fn, repeats=1, warmup=max(warmup - 1, 0), device=device)
    times: dict[K, list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            times[key] += time_call(fn, repeats=1, warmup=0, device=device)
    return times


def calls_per_sample(batch: int) -> int:
    """Calls in one timed sample at ``batch``: a batch-1 call is too short to time alone on a
    loaded machine, so a sample is up to 16 calls (``256 // batch``, at least 1)."""
    return max(1, min(16, 256 // int(batch)))


def time_batched_round_robin(
    fns: Mapping[K, Callable[[], object]],
    batches: Mapping[K, int],
    *,
    repeats: int,
    warmup: int = 2,
    device: str = "cpu",
) -> dict[K, list[float]]:
    """:func:`time_round_robin` where a sample of ``fns[k]`` is :func:`calls_per_sample`
    ``(batches[k])`` calls; returns seconds per call."""
    loops = {key: calls_per_sample(batches[key]) for key in fns}

    def looped(fn: Callable[[], object], n: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(n):
                fn()

        return run

    times = time_round_robin(
        {key: looped(fn, loops[key]) for key, fn in fns.items()},
        repeats=repeats, warmup=warmup, device=device,
    )
    return {key: [t / loops[key] for t in samples] for key, samples in times.items()}
