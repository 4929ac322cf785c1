"""The training run, top to bottom: :func:`train` sets up, runs the epochs, and finishes.

Each part with a job of its own has a module: the budget clock, stop rule and learning rate
(:mod:`training.schedule`), the NaN guard (:mod:`training.guard`), checkpoints
(:mod:`training.checkpoint`), batches (:mod:`training.batches`), evaluation
(:mod:`training.evaluate`), the exported file and the model store (:mod:`training.publish`), the
run folder (:mod:`training.outputs`) and ``torchrun`` (:mod:`training.distributed`: rank 0 owns
the clock, evaluation, files and the model store).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data import Dataset, load_dataset
from models import create_model
from training.averaging import WeightAverage
from training.batches import TrainBatches
from training.checkpoint import LoopState, load_checkpoint, resolve_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.distributed import Dist, setup_distributed
from training.evaluate import curvature_accuracy, evaluate_torch, final_evaluation
from training.guard import NanGuard
from training.loss import offset_cross_entropy
from training.memory import peak_memory, reset_peak_memory
from training.outputs import RunFiles, build_report, make_run_dir
from training.publish import store_run
from training.schedule import Cadence, Schedule, StepTimer, Stopwatch
from training.window import TrainWindow

logger = logging.getLogger(__name__)

__all__ = ["DivergenceError", "RunResult", "load_checkpoint", "setup_distributed", "train"]


class DivergenceError(RuntimeError):
    """Training kept producing NaN/Inf after ``max_nan_restarts`` restores."""


@dataclass
class RunResult:
    """What :func:`train` returns: the run folder and the report (empty on DDP ranks > 0)."""

    run_dir: Path
    report: dict[str, Any] = field(default_factory=dict)


def train(
    cfg: TrainConfig,
    *,
    resume: str | Path | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    data: Dataset | None = None,
) -> RunResult:
    """Train one model, evaluate, export and (unless ``cfg.store`` is off) store it.

    Args:
        cfg: the run's configuration.
        resume: a run folder or checkpoint to continue (same folder; the step count, model,
            optimizer, schedule position and divergence state carry on).
        progress: called on rank 0 with each guard window's record (:meth:`TrainWindow.record`).
        data: an already loaded dataset (must be ``cfg.dataset``); loaded otherwise.

    Returns:
        The run folder and, on rank 0, the report.

    Raises:
        DivergenceError: NaN/Inf persisted after ``cfg.max_nan_restarts`` restores.
        DatasetUnavailableError: the data is missing.
    """
    dist, device = setup_distributed(cfg.device)
    try:
        # -- set-up: config, data, model and optimizer (or the checkpoint's), run folder ------
        cfg = cfg.resolved(device.type)
        data = _dataset(cfg, data)
        model, optimizer = _model_and_optimizer(cfg, data, device)
        state, run_dir, saved_average = _start_or_resume(cfg, dist, resume, model, optimizer)
        net = dist.wrap(model, device)
        amp = cfg.amp and device.type == "cuda" and cfg.defaults.amp
        files = _open_run_files(run_dir, cfg, model, dist, device, amp, state.step)
        batches = TrainBatches(data, cfg, dist, device, state.step)
        schedule = Schedule(cfg, batches.steps_per_epoch)
        reset_peak_memory(device)
        clock, timer = Stopwatch(device, state.elapsed_s), StepTimer()
        guard, cadence = NanGuard(model, optimizer), Cadence(cfg, state.elapsed_s)
        average = _weight_average(cfg, model, saved_average)
        window = TrainWindow(device, schedule, batches, state.elapsed_s)

        # -- the epochs: one optimizer step per pass, the guard every ``guard_every`` steps --
        clock.start()
        net.train()
        unlogged = None  # the last accepted window's record, if the cadence did not log it
        while True:
            elapsed = timer.observe(dist.broadcast(clock.elapsed(), device))
            if schedule.finished(elapsed, state.step, timer.step_time):
                break
            xb, yb = batches.get(state.epoch, state.batch_in_epoch)  # (B, C, H, W) in [0, 1]
            lr = schedule.set_lr(optimizer, elapsed, state.step, state.lr_scale)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(xb)
            loss = training_loss(cfg, model, logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            window.add(loss, logits, yb)
            epoch_done = state.advance(batches.global_batch, batches.steps_per_epoch)
            if state.step % cfg.guard_every and not epoch_done:
                continue

            # NaN guard: every guard_every steps (one sync), and on the last step of an epoch.
            failed = dist.any(guard.window_failed(window.loss))
            elapsed = clock.elapsed(sync=True)
            if failed.item() > 0:
                _on_divergence(cfg, guard, state, files, elapsed, lr)
            else:
                guard.accept()
                if average is not None:
                    average.update(state.step)
                record = window.record(state, elapsed, lr=lr)
                if dist.main and progress is not None:
                    progress(record)
                unlogged = record
                if dist.main and cadence.log_due(elapsed, epoch_done):
                    files.event("train", **record)
                    unlogged = None
            window.reset(elapsed)

            # Evaluation and checkpoints: the clock is paused (not charged to the budget).
            want_eval = cadence.eval_due(elapsed, state.epoch, epoch_done)
            want_checkpoint = cadence.checkpoint_due(elapsed)
            if want_eval or want_checkpoint:
                clock.pause()
                if want_eval and dist.main:
                    _evaluate(model, data, cfg, device, files, state, elapsed, batches)
                    net.train()
                if want_checkpoint:
                    _checkpoint(files, cfg, model, optimizer, state, elapsed, average)
                clock.start()

        # -- finish: the last window, a final checkpoint, then rank 0 evaluates and publishes --
        clock.pause()
        state.elapsed_s = dist.broadcast(clock.elapsed(), device)
        if window.count > 0:  # the steps after the last guard window
            files.event("train", **window.record(state, state.elapsed_s))
        elif unlogged is not None:  # the run ended on a guard window the cadence did not log
            files.event("train", **unlogged)
        _keep_last_good_weights(cfg, guard, state)
        environment = _environment(model, device, dist, amp)
        if average is not None:  # the steps after the last accepted window
            average.update(state.step)
        _checkpoint(files, cfg, model, optimizer, state, state.elapsed_s, average)
        if average is not None:  # evaluate, export and audit the average (checkpoint: both)
            average.copy_to_model()
        if not dist.main:
            return RunResult(run_dir)
        report = finish_run(model, data, cfg, files, device, state, batches, environment)
        return RunResult(run_dir, report)
    finally:
        dist.end_run()


# -- the parts of the loop ---------------------------------------------------------------------
def training_loss(
    cfg: TrainConfig, model: nn.Module, logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The method's loss (offset cross-entropy, or plain for the baseline) and the regularizer."""
    if cfg.defaults.offset_loss:
        loss = offset_cross_entropy(logits, labels, cfg.offset, cfg.temperature)
    else:
        loss = nn.functional.cross_entropy(logits.float(), labels)
    if cfg.curvature_weight > 0:
        loss = loss + cfg.curvature_weight * model.head.head.curvature_penalty()
    return loss


def _dataset(cfg: TrainConfig, data: Dataset | None) -> Dataset:
    if data is None:
        return load_dataset(cfg.dataset, cfg.data_dir)
    if data.name != cfg.dataset:
        raise ValueError(f"data is {data.name!r} but the config says {cfg.dataset!r}")
    return data


def _model_and_optimizer(
    cfg: TrainConfig, data: Dataset, device: torch.device
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The network and SGD. Same seed on every rank; DDP also broadcasts rank 0's weights."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels once
    torch.manual_seed(cfg.seed)
    model = create_model(
        cfg.method,
        cfg.size,
        data.in_channels,
        data.num_classes,
        data.image_size,
        mean=data.mean,
        head=cfg.head,
        activation=cfg.activation,
        pool=cfg.pool,
        layer_options=cfg.layer_options or None,
    ).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.peak_lr, momentum=cfg.momentum, weight_decay=cfg.wd
    )
    return model, optimizer


def _start_or_resume(
    cfg: TrainConfig,
    dist: Dist,
    resume: str | Path | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> tuple[LoopState, Path, dict[str, Any] | None]:
    """A new run folder and loop state, or the checkpoint's (loaded into model and optimizer),
    with the checkpoint's weight average when it holds one."""
    if resume is None:
        return LoopState(), make_run_dir(cfg) if dist.main else Path(cfg.out), None
    ckpt = load_checkpoint(resume)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    state = LoopState.from_dict(ckpt["state"])
    return state, resolve_checkpoint(resume).parent, ckpt.get("average")


def _weight_average(
    cfg: TrainConfig, model: nn.Module, saved: dict[str, Any] | None
) -> WeightAverage | None:
    """The run's EMA of the weights (``cfg.ema_decay``), continued from ``saved`` (the resumed
    checkpoint's) when there is one."""
    if cfg.ema_decay is None:
        return None
    average = WeightAverage(model, cfg.ema_decay)
    if saved is not None:
        average.load_state_dict(saved)
    return average


def _open_run_files(
    run_dir: Path,
    cfg: TrainConfig,
    model: nn.Module,
    dist: Dist,
    device: torch.device,
    amp: bool,
    start_step: int,
) -> RunFiles:
    """The run folder's files, starting with ``config.json``: the resolved config and how the
    run was placed."""
    files = RunFiles(run_dir, dist.main)
    parameters = sum(p.numel() for p in model.parameters())
    files.write_json(
        "config.json",
        dict(
            cfg.to_dict(),
            device_resolved=str(device),
            world_size=dist.world,
            amp_used=amp,
            parameters=parameters,
            model_config=model.config,
            torch_version=torch.__version__,
            resumed_from_step=start_step,
        ),
    )
    if dist.main:
        logger.info(
            "run %s: %s %s on %s, %d parameters, device %s x%d, amp %s",
            files.run_dir, cfg.method, cfg.size, cfg.dataset, parameters, device, dist.world, amp,
        )
    return files


def _on_divergence(
    cfg: TrainConfig, guard: NanGuard, state: LoopState, files: RunFiles, elapsed: float, lr: float
) -> None:
    """A non-finite window: restore, halve the learning rate, log; give up past the limit.

    Raises:
        DivergenceError: more than ``cfg.max_nan_restarts`` restores.
    """
    state.nan_restarts += 1
    state.lr_scale *= 0.5
    guard.restore()
    logger.warning(
        "%s: non-finite loss or weights at step %d; restored the last good state, learning rate "
        "scale now %.3g (restart %d of %d)",
        cfg.method, state.step, state.lr_scale, state.nan_restarts, cfg.max_nan_restarts,
    )
    files.event("nan", step=state.step, elapsed_s=elapsed, lr_scale=state.lr_scale)
    if state.nan_restarts > cfg.max_nan_restarts:
        raise DivergenceError(
            f"{cfg.method} diverged {state.nan_restarts} times; last lr {lr:.3g}"
        )


def _keep_last_good_weights(cfg: TrainConfig, guard: NanGuard, state: LoopState) -> None:
    """A divergence within the last guard window: keep the last good weights."""
    if guard.restore_weights_if_diverged():
        state.nan_restarts += 1
        logger.warning(
            "%s: non-finite weights after the last step; kept the last good state", cfg.method
        )


def _evaluate(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    device: torch.device,
    files: RunFiles,
    state: LoopState,
    elapsed: float,
    batches: TrainBatches,
) -> None:
    """An intermediate evaluation (audited, in torch), logged to ``metrics.jsonl``."""
    t_eval = time.perf_counter()
    result = evaluate_torch(model, data, cfg, device)
    files.event(
        "eval",
        step=state.step,
        epoch=state.step / batches.steps_per_epoch,
        elapsed_s=elapsed,
        **result,
        eval_time_s=time.perf_counter() - t_eval,
    )
    logger.info(
        "eval at step %d: clean %.4f, certified %s",
        state.step, result["clean_accuracy"], result["certified_accuracy"],
    )


def _checkpoint(
    files: RunFiles,
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: LoopState,
    elapsed: float,
    average: WeightAverage | None = None,
) -> None:
    if files.main:
        state.elapsed_s = elapsed
        saved = None if average is None else average.state_dict()
        save_checkpoint(files.run_dir, cfg.to_dict(), model, optimizer, state, saved)


def _environment(model: nn.Module, device: torch.device, dist: Dist, amp: bool) -> dict[str, Any]:
    """Where and how the run trained, for the report (peak memory read now)."""
    peak, kind = peak_memory(device)
    return dict(
        peak_memory_bytes=peak,
        peak_memory_kind=kind,
        parameters=sum(p.numel() for p in model.parameters()),
        device=str(device),
        world_size=dist.world,
        amp=amp,
    )


def finish_run(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    files: RunFiles,
    device: torch.device,
    state: LoopState,
    batches: TrainBatches,
    environment: dict[str, Any],
) -> dict[str, Any]:
    """Rank 0 after training: export and evaluate, report, store; returns the report."""
    final = final_evaluation(
        model,
        data,
        cfg,
        files.run_dir,
        device,
        dict(
            train_time_s=state.elapsed_s,
            epochs=state.step / batches.steps_per_epoch,
            steps=state.step,
        ),
    )
    report = build_report(
        cfg, list(data.classes), files.run_dir, final, state, batches.steps_per_epoch, environment
    )
    if cfg.head == "crc":
        report["certified_accuracy_curvature"] = curvature_accuracy(
            model, data, cfg, float(final.bounds["lipschitz_bound_body"])
        )
    files.event(
        "final",
        step=state.step,
        elapsed_s=state.elapsed_s,
        clean_accuracy=report["clean_accuracy"],
        certified_accuracy=report["certified_accuracy"],
    )
    if cfg.store and final.onnx is not None:
        report["store_tag"] = store_run(final.onnx, report)
    files.write_json("report.json", report)
    logger.info(
        "%s %s on %s: clean %.4f, certified %s, bound %.6f, %.1f s, %s",
        cfg.method,
        cfg.size,
        cfg.dataset,
        report["clean_accuracy"],
        report["certified_accuracy"],
        report["lipschitz_bound"],
        state.elapsed_s,
        report.get("store_tag", "not stored"),
    )
    return report
