"""The training run: budgeted SGD, NaN guard, checkpoints, evaluation, export, model store.

Reads top to bottom as :func:`train`: set up (device, DDP, data, model, optimizer, resume), the
loop, then the final evaluation on the exported ONNX file. Time accounting (airbench style):
the budget clock runs only while training; evaluation and checkpoint writes pause it, and on
CUDA the clock is read after a synchronize so queued kernels are charged to training. The
learning rate is :func:`training.loss.one_cycle_lr` of the elapsed fraction of the budget (or of
the step count with ``epochs``), so a budgeted run always ends with a complete schedule.

Certified accuracy is always computed with the *audited* bound: intermediate evaluations audit
the plain network (``certify.audit.audit``) and evaluate it in torch; the final one evaluates the
exported ONNX file in ONNX Runtime with the bound and head certificate stored in its metadata
(``models.export.certificate_kwargs``), exactly what ``python -m certify evaluate`` does.

Distributed (``torchrun``): one process per device, DistributedDataParallel (gloo on CPU, nccl on
CUDA), the global batch split evenly. Rank 0 owns the clock (its elapsed time is broadcast every
step, so every rank follows the same schedule and stops at the same step), evaluation, files and
the model store.
"""

from __future__ import annotations

import collections
import copy
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.config import FFT_METHODS, TrainConfig, default_batch_size
from training.data import AUGMENTATIONS, Dataset, augment, load_dataset
from training.loss import offset_cross_entropy, one_cycle_lr
from training.memory import peak_rss_bytes, reset_peak_rss

logger = logging.getLogger(__name__)

#: Methods trained without bf16 autocast on CUDA: the FFT methods (complex arithmetic) and BCOP
#: (its Björck orthogonalization in bf16 drifts far from orthogonal).
NO_AMP_METHODS = FFT_METHODS | {"bcop"}
CHECKPOINT = "checkpoint.pt"
#: NaN guard: how many verified states are kept (the start and the newest ones).
GOOD_STATES = 4
#: Training-metric lines in ``metrics.jsonl`` at most this often (training seconds).
LOG_EVERY_S = 10.0


class DivergenceError(RuntimeError):
    """Training kept producing NaN/Inf after ``max_nan_restarts`` restores."""


@dataclass
class RunResult:
    """What :func:`train` returns: the run folder and the report (empty on DDP ranks > 0)."""

    run_dir: Path
    report: dict[str, Any] = field(default_factory=dict)


# -- small helpers -----------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[_Dist, torch.device]:
    """The process's rank and device; joins the process group under ``torchrun``.

    Idempotent: an already initialized group is reused (``active``), never re-initialized.

    Args:
        device_name: ``auto``, ``cpu`` or ``cuda``.

    Raises:
        ValueError: ``cuda`` without CUDA.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' requested but CUDA is not available; use --device cpu or auto"
        )
    device = torch.device(f"cuda:{local_rank}") if device_name == "cuda" else torch.device("cpu")
    if world <= 1:
        return _Dist(), device
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, True), device


class _Stopwatch:
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


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return peak_rss_bytes(), "cpu_peak_rss"


def _run_dir(cfg: TrainConfig) -> Path:
    parent = Path(cfg.out) / cfg.dataset
    stamp = time.strftime("%Y%m%d-%H%M%S")
    variant = cfg.variant.replace("=", "-").replace("+", "-")
    name = f"{cfg.method}-{variant}-{cfg.size}" if variant else f"{cfg.method}-{cfg.size}"
    base = parent / f"{name}-{stamp}"
    path, n = base, 1
    while path.exists():  # sweeps can start two runs within one second
        path, n = Path(f"{base}-{n}"), n + 1
    path.mkdir(parents=True)
    return path


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _epoch_order(
    seed: int, epoch: int, n: int, per_rank: int, world: int, rank: int
) -> torch.Tensor:
    """This rank's sample indices for one epoch: ``(steps_per_epoch, per_rank)``, same on resume."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    steps = n // (per_rank * world)
    return perm[: steps * per_rank * world].view(steps, world, per_rank)[:, rank]


def _broadcast_float(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.broadcast(t, 0)
    return float(t)


def _all_finite(model: nn.Module) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


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
    """Load a checkpoint written by :func:`train` (tensors on the CPU)."""
    return torch.load(resolve_checkpoint(path), map_location="cpu", weights_only=True)


# -- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def _logits(
    model: nn.Module, images: torch.Tensor, batch: int, device: torch.device
) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].to(device, non_blocking=True).float().div_(255)
        out.append(model(x).float().cpu())
    return torch.cat(out)


def evaluate_torch(
    model: nn.Module, data: Dataset, cfg: TrainConfig, device: torch.device, *, full: bool = False
) -> dict[str, Any]:
    """Clean and certified accuracy of the current model: its plain form, audited on the CPU.

    Args:
        full: also compute the audit's power-iteration lower estimate (slower).

    Returns:
        ``{"clean_accuracy", "certified_accuracy": {eps_key: fraction}, "lipschitz_bound",
        "lipschitz_bound_body", "lipschitz_bound_head", "lipschitz_lower", "certificate"}``.
    """
    from certify import audit, certified_accuracy
    from models.export import to_plain

    plain = to_plain(copy.deepcopy(model).cpu())
    result = audit(plain, data.input_shape, lower=full)
    kwargs = result.certificate_kwargs()
    logits = _logits(plain.to(device), data.test_images, cfg.eval_batch_size, device)
    acc = certified_accuracy(logits, data.test_labels, cfg.eval_eps, **kwargs)
    clean = acc.pop("clean")
    return dict(
        clean_accuracy=clean,
        certified_accuracy=acc,
        lipschitz_bound=result.bound,
        lipschitz_bound_body=result.body_bound,
        lipschitz_bound_head=result.head_bound,
        lipschitz_lower=result.lower,
        certificate=result.certificate,
    )


def evaluate_onnx(
    path: str | Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: tuple[float, ...],
    batch: int = 1000,
    cuda: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Clean and certified accuracy of an exported model, from ONNX Runtime logits.

    The model is verified first (metadata, weights hash); the certificate uses the audited bound
    and head distances in its metadata. ``cuda``: use ONNX Runtime's CUDA provider if it has one.

    Returns:
        ``(accuracy, metadata)``; accuracy as in :func:`evaluate_torch` without the bound.
    """
    import onnxruntime as ort

    from certify import certified_accuracy
    from models.export import INPUT_NAME, OUTPUT_NAME, certificate_kwargs, load_onnx

    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session, meta = load_onnx(path, providers=providers)
    out = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].float().div_(255).numpy()
        out.append(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
    acc = certified_accuracy(np.concatenate(out), labels.numpy(), eps, **certificate_kwargs(meta))
    clean = acc.pop("clean")
    return dict(clean_accuracy=clean, certified_accuracy=acc), meta


def _add_onnx_metadata(path: Path, extra: dict[str, Any]) -> None:
    """Add ``metadata_props`` to an exported file (the weights, hence their hash, are untouched)."""
    import onnx

    proto = onnx.load(str(path))
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in extra.items():
        text = value if isinstance(value, str) else json.dumps(value)
        entry = existing.get(key) or proto.metadata_props.add()
        entry.key, entry.value = key, text
    onnx.save_model(proto, str(path), save_as_external_data=False)


def _final_evaluation(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    run_dir: Path,
    device: torch.device,
    training: dict[str, Any],
) -> dict[str, Any]:
    """Export, audit and evaluate the trained model (``cfg.export``), or audit it in torch.

    Returns:
        ``{"accuracy", "metadata" (of the ONNX file, or None), "onnx" (path or None),
        "export_time_s", "eval_time_s"}``.
    """
    if not cfg.export:
        t_eval = time.perf_counter()
        acc = evaluate_torch(model, data, cfg, device, full=True)
        return dict(
            accuracy=acc,
            metadata=None,
            onnx=None,
            export_time_s=0.0,
            eval_time_s=time.perf_counter() - t_eval,
        )
    from models.export import to_onnx

    t_export = time.perf_counter()
    onnx_path = to_onnx(
        copy.deepcopy(model).cpu(),
        run_dir / "model.onnx",
        input_shape=data.input_shape,
        metadata=dict(dataset=cfg.dataset, classes=list(data.classes), **training),
    )
    export_time = time.perf_counter() - t_export
    t_eval = time.perf_counter()
    acc, meta = evaluate_onnx(
        onnx_path,
        data.test_images,
        data.test_labels,
        eps=cfg.eval_eps,
        batch=cfg.eval_batch_size,
        cuda=device.type == "cuda",
    )
    eval_time = time.perf_counter() - t_eval
    # The accuracies go into the file too (metadata only: the weights and their hash are kept).
    _add_onnx_metadata(
        onnx_path,
        dict(clean_accuracy=acc["clean_accuracy"], certified_accuracy=acc["certified_accuracy"]),
    )
    return dict(
        accuracy=acc,
        metadata=meta,
        onnx=onnx_path,
        export_time_s=export_time,
        eval_time_s=eval_time,
    )


# -- the run -----------------------------------------------------------------------------------
def train(
    cfg: TrainConfig,
    *,
    resume: str | Path | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    data: Dataset | None = None,
) -> RunResult:
    """Train one model, evaluate it, export it and (unless ``cfg.store`` is off) store it.

    Args:
        cfg: the run's configuration.
        resume: a run folder or checkpoint to continue (same folder, step count continued; the
            model, optimizer, schedule position and divergence state are restored).
        progress: called on rank 0 about every ``guard_every`` steps with a dict (``step``,
            ``epoch``, ``elapsed_s``, ``budget_s``, ``total_steps``, ``loss``, ``acc``,
            ``images_per_s``, ``lr``), e.g. to drive a progress bar.
        data: an already loaded dataset (must be ``cfg.dataset``); loaded otherwise.

    Returns:
        The :class:`RunResult`.

    Raises:
        DivergenceError: NaN/Inf persisted after ``cfg.max_nan_restarts`` restores.
        DatasetUnavailableError: the data is missing.
    """
    import torch.distributed as dist

    from models import create_model

    owns_group = not (dist.is_available() and dist.is_initialized())
    dist_ctx, device = setup_distributed(cfg.device)
    try:
        cfg = cfg.resolved()
        if cfg.batch_size is None:
            cfg = replace(cfg, batch_size=default_batch_size(cfg.method, device.type))
        ckpt = load_checkpoint(resume) if resume is not None else None
        if data is None:
            data = load_dataset(cfg.dataset, cfg.data_dir)
        elif data.name != cfg.dataset:
            raise ValueError(f"data is {data.name!r} but the config says {cfg.dataset!r}")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        # Model and optimizer. Same seed on every rank; DDP also broadcasts rank 0's weights.
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
        state = dict(
            step=0, epoch=0, batch_in_epoch=0, elapsed_s=0.0, lr_scale=1.0, nan_restarts=0, images=0
        )
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            state.update(ckpt["state"])
            run_dir = resolve_checkpoint(resume).parent
        else:
            run_dir = _run_dir(cfg) if dist_ctx.main else Path(cfg.out)
        net: nn.Module = model
        if dist_ctx.active:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        amp = cfg.amp and device.type == "cuda" and cfg.method not in NO_AMP_METHODS
        parameters = sum(p.numel() for p in model.parameters())

        metrics = run_dir / "metrics.jsonl"
        if dist_ctx.main:
            resolved = dict(
                cfg.to_dict(),
                device_resolved=str(device),
                world_size=dist_ctx.world,
                amp_used=amp,
                parameters=parameters,
                model_config=model.config,
                torch_version=torch.__version__,
                resumed_from_step=state["step"],
            )
            (run_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
            logger.info(
                "run %s: %s %s on %s, %d parameters, device %s x%d, amp %s",
                run_dir,
                cfg.method,
                cfg.size,
                cfg.dataset,
                parameters,
                device,
                dist_ctx.world,
                amp,
            )

        # Data in memory on the device; this rank's share of each global batch.
        x_train = data.train_images.to(device)
        y_train = data.train_labels.to(device)
        n = len(x_train)
        per_rank = max(1, min(cfg.batch_size, n) // dist_ctx.world)
        steps_per_epoch = max(1, n // (per_rank * dist_ctx.world))
        total_steps = None if cfg.epochs is None else cfg.epochs * steps_per_epoch
        spec = AUGMENTATIONS[cfg.dataset]
        aug_gen = torch.Generator(device=device).manual_seed(
            cfg.seed * 7919 + dist_ctx.rank + 104_729 * state["step"]
        )

        def fraction(elapsed: float) -> float:
            if cfg.budget_s is not None:
                return elapsed / cfg.budget_s
            return state["step"] / total_steps

        def checkpoint(elapsed: float) -> None:
            if dist_ctx.main:
                state["elapsed_s"] = elapsed
                _atomic_save(
                    dict(
                        config=cfg.to_dict(),
                        model=model.state_dict(),
                        optimizer=optimizer.state_dict(),
                        state=dict(state),
                    ),
                    run_dir / CHECKPOINT,
                )

        def snapshot() -> dict[str, Any]:
            return dict(
                model=copy.deepcopy(model.state_dict()),
                optimizer=copy.deepcopy(optimizer.state_dict()),
            )

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:  # a sweep runs one model after another in this process: forget earlier peaks
            reset_peak_rss()
        clock = _Stopwatch(device, offset=state["elapsed_s"])
        # NaN guard. ``good``: states each followed by a finite window, newest last (the first is
        # the start). ``pending``, the latest finite state, joins them once the next window is
        # finite too. A restore that fails again at once discards the newest good state: a state
        # can be finite yet already doomed (huge weights), so consecutive failures walk back.
        pending = snapshot()
        good = [pending]
        failures_in_a_row = 0
        order = None
        window_loss = torch.zeros((), device=device)
        window_correct = torch.zeros((), device=device)
        window_count, window_start = 0, state["elapsed_s"]
        # Training time per step, to stop before the budget ends: the median of the newest
        # steps (robust to a slow guard/sync step), the first step (warm-up) left out.
        recent_steps: collections.deque[float] = collections.deque(maxlen=7)
        step_time, prev_elapsed, warm = 0.0, None, False
        last_log = last_ckpt = state["elapsed_s"]
        lr = 0.0
        next_eval_s = (state["elapsed_s"] + cfg.eval_every_s) if cfg.eval_every_s else math.inf
        clock.start()
        net.train()
        while True:
            elapsed = clock.elapsed()
            if dist_ctx.active:  # every rank follows rank 0's clock
                elapsed = _broadcast_float(elapsed, device)
            if prev_elapsed is not None:  # training time per step (pauses are not in it)
                if warm:
                    recent_steps.append(elapsed - prev_elapsed)
                    step_time = statistics.median(recent_steps)
                warm = True
            prev_elapsed = elapsed
            if cfg.budget_s is not None:
                if elapsed + 0.5 * step_time >= cfg.budget_s:
                    break
            elif state["step"] >= total_steps:
                break
            frac = fraction(elapsed)

            if order is None or state["batch_in_epoch"] == 0:
                order = _epoch_order(
                    cfg.seed, state["epoch"], n, per_rank, dist_ctx.world, dist_ctx.rank
                ).to(device)
            idx = order[state["batch_in_epoch"]]
            xb = augment(x_train[idx], spec, aug_gen).float().div_(255)  # (B, C, H, W) in [0, 1]
            yb = y_train[idx]
            lr = one_cycle_lr(
                frac,
                cfg.peak_lr,
                warmup_frac=cfg.warmup_frac,
                div_factor=cfg.div_factor,
                final_div_factor=cfg.final_div_factor,
            )
            lr *= state["lr_scale"]
            for group in optimizer.param_groups:
                group["lr"] = lr

            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(xb)
            if cfg.method == "standard":
                loss = nn.functional.cross_entropy(logits.float(), yb)
            else:
                loss = offset_cross_entropy(logits, yb, cfg.offset, cfg.temperature)
            if cfg.curvature_weight > 0:
                loss = loss + cfg.curvature_weight * model.head.head.curvature_penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            window_loss += loss.detach()
            window_correct += (logits.detach().argmax(1) == yb).sum()
            window_count += 1
            state["step"] += 1
            state["images"] += per_rank * dist_ctx.world
            state["batch_in_epoch"] += 1
            epoch_done = state["batch_in_epoch"] == steps_per_epoch
            if epoch_done:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0

            # NaN guard: every guard_every steps (one sync), and on the last step of an epoch.
            if state["step"] % cfg.guard_every == 0 or epoch_done:
                bad = torch.tensor(
                    [0.0 if (torch.isfinite(window_loss) and _all_finite(model)) else 1.0],
                    device=device,
                )
                if dist_ctx.active:
                    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
                elapsed = clock.elapsed(sync=True)
                if bad.item() > 0:
                    state["nan_restarts"] += 1
                    state["lr_scale"] *= 0.5
                    failures_in_a_row += 1
                    if failures_in_a_row > 1 and len(good) > 1:
                        good.pop()
                    model.load_state_dict(good[-1]["model"])
                    optimizer.load_state_dict(good[-1]["optimizer"])
                    pending = good[-1]
                    logger.warning(
                        "%s: non-finite loss or weights at step %d; restored the last good "
                        "state, learning rate scale now %.3g (restart %d of %d)",
                        cfg.method,
                        state["step"],
                        state["lr_scale"],
                        state["nan_restarts"],
                        cfg.max_nan_restarts,
                    )
                    if dist_ctx.main:
                        _append_jsonl(
                            metrics,
                            dict(
                                event="nan",
                                step=state["step"],
                                elapsed_s=elapsed,
                                lr_scale=state["lr_scale"],
                            ),
                        )
                    if state["nan_restarts"] > cfg.max_nan_restarts:
                        raise DivergenceError(
                            f"{cfg.method} diverged {state['nan_restarts']} times; last lr {lr:.3g}"
                        )
                else:
                    failures_in_a_row = 0
                    if pending is not good[-1]:
                        good = [good[0], *good[1:][-(GOOD_STATES - 2) :], pending]
                    pending = snapshot()
                    record = dict(
                        step=state["step"],
                        epoch=state["step"] / steps_per_epoch,
                        elapsed_s=elapsed,
                        budget_s=cfg.budget_s,
                        total_steps=total_steps,
                        lr=lr,
                        loss=float(window_loss) / window_count,
                        acc=float(window_correct) / (window_count * per_rank),
                        images_per_s=window_count
                        * per_rank
                        * dist_ctx.world
                        / max(1e-9, elapsed - window_start),
                    )
                    if dist_ctx.main and progress is not None:
                        progress(record)
                    if dist_ctx.main and (elapsed - last_log >= LOG_EVERY_S or epoch_done):
                        _append_jsonl(metrics, dict(event="train", **record))
                        last_log = elapsed
                window_loss.zero_()
                window_correct.zero_()
                window_count, window_start = 0, elapsed

                # Evaluation and checkpoints: the clock is paused (not charged to the budget).
                want_eval = (
                    epoch_done and cfg.eval_every and state["epoch"] % cfg.eval_every == 0
                ) or elapsed >= next_eval_s
                want_ckpt = elapsed - last_ckpt >= cfg.checkpoint_every_s
                if want_eval or want_ckpt:
                    clock.pause()
                    if want_eval and dist_ctx.main:
                        t_eval = time.perf_counter()
                        result = evaluate_torch(model, data, cfg, device)
                        _append_jsonl(
                            metrics,
                            dict(
                                event="eval",
                                step=state["step"],
                                epoch=state["step"] / steps_per_epoch,
                                elapsed_s=elapsed,
                                **result,
                                eval_time_s=time.perf_counter() - t_eval,
                            ),
                        )
                        logger.info(
                            "eval at step %d: clean %.4f, certified %s",
                            state["step"],
                            result["clean_accuracy"],
                            result["certified_accuracy"],
                        )
                        net.train()
                    if want_eval:
                        next_eval_s = (elapsed + cfg.eval_every_s) if cfg.eval_every_s else math.inf
                    if want_ckpt:
                        checkpoint(elapsed)
                        last_ckpt = elapsed
                    clock.start()

        clock.pause()
        train_time = clock.elapsed()
        if dist_ctx.active:
            train_time = _broadcast_float(train_time, device)
        state["elapsed_s"] = train_time
        if dist_ctx.main and window_count > 0:  # the steps after the last guard window
            _append_jsonl(metrics, dict(
                event="train", step=state["step"], epoch=state["step"] / steps_per_epoch,
                elapsed_s=train_time, budget_s=cfg.budget_s, total_steps=total_steps,
                loss=float(window_loss) / window_count,
                acc=float(window_correct) / (window_count * per_rank),
                images_per_s=window_count * per_rank * dist_ctx.world
                / max(1e-9, train_time - window_start),
            ))
        if not _all_finite(model):  # a divergence within the last guard window
            model.load_state_dict(good[-1]["model"])
            state["nan_restarts"] += 1
            logger.warning(
                "%s: non-finite weights after the last step; kept the last good state", cfg.method
            )
        peak_mem, mem_kind = _peak_memory(device)
        checkpoint(train_time)
        if not dist_ctx.main:
            return RunResult(run_dir)

        # Final evaluation on the exported, audited ONNX file (or the audited plain network).
        epochs_done = state["step"] / steps_per_epoch
        final = _final_evaluation(
            model,
            data,
            cfg,
            run_dir,
            device,
            dict(train_time_s=train_time, epochs=epochs_done, steps=state["step"]),
        )
        acc = meta = final["accuracy"]
        onnx_path = final["onnx"]
        if onnx_path is not None:
            meta = final["metadata"]
        export_time, eval_time = final["export_time_s"], final["eval_time_s"]
        report: dict[str, Any] = dict(
            method=cfg.method,
            size=cfg.size,
            dataset=cfg.dataset,
            variant=cfg.variant,
            head=cfg.head,
            activation=cfg.activation,
            pool=cfg.pool,
            classes=list(data.classes),
            run_dir=str(run_dir),
            clean_accuracy=acc["clean_accuracy"],
            certified_accuracy=acc["certified_accuracy"],
            lipschitz_bound=meta["lipschitz_bound"],
            lipschitz_bound_body=meta["lipschitz_bound_body"],
            lipschitz_bound_head=meta["lipschitz_bound_head"],
            lipschitz_lower=meta.get("lipschitz_lower"),
            certificate=meta["certificate"],
            train_time_s=train_time,
            budget_s=cfg.budget_s,
            epochs=epochs_done,
            steps=state["step"],
            steps_per_epoch=steps_per_epoch,
            time_per_epoch_s=train_time / epochs_done if epochs_done else None,
            images_per_s=state["images"] / train_time if train_time > 0 else None,
            peak_memory_bytes=peak_mem,
            peak_memory_kind=mem_kind,
            parameters=parameters,
            device=str(device),
            world_size=dist_ctx.world,
            amp=amp,
            batch_size=cfg.batch_size,
            lr=cfg.peak_lr,
            weight_decay=cfg.wd,
            seed=cfg.seed,
            nan_restarts=state["nan_restarts"],
            final_lr_scale=state["lr_scale"],
            export_time_s=export_time,
            eval_time_s=eval_time,
            onnx=None if onnx_path is None else str(onnx_path),
            weights_sha256=meta.get("weights_sha256"),
            torch_version=torch.__version__,
        )
        if cfg.head == "crc":
            # The paper's curvature certificate needs the features: python only, not served.
            from certify.curvature import curvature_certified_accuracy
            from models.export import to_plain

            report["certified_accuracy_curvature"] = curvature_certified_accuracy(
                to_plain(copy.deepcopy(model).cpu()), data.test_images, data.test_labels,
                cfg.eval_eps, body_bound=float(meta["lipschitz_bound_body"]),
            )
        _append_jsonl(
            metrics,
            dict(
                event="final",
                step=state["step"],
                elapsed_s=train_time,
                clean_accuracy=report["clean_accuracy"],
                certified_accuracy=report["certified_accuracy"],
            ),
        )
        if cfg.store and onnx_path is not None:
            from training.store import save_to_store

            report["store_tag"] = save_to_store(onnx_path, report)
        (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        logger.info(
            "%s %s on %s: clean %.4f, certified %s, bound %.6f, %.1f s, %s",
            cfg.method,
            cfg.size,
            cfg.dataset,
            report["clean_accuracy"],
            report["certified_accuracy"],
            report["lipschitz_bound"],
            train_time,
            report.get("store_tag", "not stored"),
        )
        return RunResult(run_dir, report)
    finally:
        if dist_ctx.active:
            dist.barrier()  # ranks > 0 wait for rank 0's export before the next run or exit
            if owns_group:
                dist.destroy_process_group()
