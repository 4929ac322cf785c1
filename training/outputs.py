"""The run folder ``<out>/<dataset>/<method>[-<variant>]-<size>-<stamp>/`` and what rank 0
writes there: ``config.json``, ``metrics.jsonl`` (train / eval / nan / final events) and
``report.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import LoopState
from training.config import TrainConfig
from training.evaluate import FinalEvaluation

#: The config fields that say what a run trained, first in every report.
WHAT_WAS_TRAINED = ("method", "size", "dataset", "variant", "head", "activation", "pool")


def make_run_dir(cfg: TrainConfig) -> Path:
    """A new, empty run folder named after the config and the time."""
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


class RunFiles:
    """The run folder's text files; only rank 0 (``main``) writes.

    Args:
        run_dir: the run folder.
        main: whether this process writes.
    """

    def __init__(self, run_dir: Path, main: bool) -> None:
        self.run_dir, self.main = run_dir, main
        self.metrics = run_dir / "metrics.jsonl"

    def event(self, event: str, **record: Any) -> None:
        """Append one line ``{"event": event, **record}`` to ``metrics.jsonl``."""
        if self.main:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(dict(event=event, **record)) + "\n")

    def write_json(self, name: str, doc: dict[str, Any]) -> None:
        """Write ``name`` (``config.json``, ``report.json``) as indented JSON."""
        if self.main:
            (self.run_dir / name).write_text(json.dumps(doc, indent=2) + "\n")


def build_report(
    cfg: TrainConfig,
    classes: list[str],
    run_dir: Path,
    final: FinalEvaluation,
    state: LoopState,
    steps_per_epoch: int,
    environment: dict[str, Any],
) -> dict[str, Any]:
    """``report.json``: what was trained, the audited accuracies and bounds, time and memory.

    Args:
        environment: ``peak_memory_bytes``, ``peak_memory_kind``, ``parameters``, ``device``,
            ``world_size``, ``amp`` (in this order; copied as they are).
    """
    acc, meta, train_time = final.accuracy, final.bounds, state.elapsed_s
    epochs_done = state.step / steps_per_epoch
    return dict(
        **{name: getattr(cfg, name) for name in WHAT_WAS_TRAINED},
        classes=classes,
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
        steps=state.step,
        steps_per_epoch=steps_per_epoch,
        time_per_epoch_s=train_time / epochs_done if epochs_done else None,
        images_per_s=state.images / train_time if train_time > 0 else None,
        **environment,
        batch_size=cfg.batch_size,
        lr=cfg.peak_lr,
        weight_decay=cfg.wd,
        seed=cfg.seed,
        eps_train=cfg.eps_train,
        temperature=cfg.temperature,
        ema_decay=cfg.ema_decay,
        nan_restarts=state.nan_restarts,
        final_lr_scale=state.lr_scale,
        export_time_s=final.export_time_s,
        eval_time_s=final.eval_time_s,
        onnx=None if final.onnx is None else str(final.onnx),
        weights_sha256=meta.get("weights_sha256"),
        preset=cfg.preset,
        torch_version=torch.__version__,
    )
