"""Certified evaluation during and after training, always with the *audited* bound.

Intermediate evaluations audit the plain network (``certify.audit.audit``) and evaluate it in
torch; the final one evaluates the exported ONNX file in ONNX Runtime with the bound and head
certificate stored in its metadata, exactly what ``python -m certify evaluate`` does
(:mod:`training.publish`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certify.audit import audit
from certify.curvature import curvature_certified_accuracy
from certify.radius import certified_accuracy
from data import Dataset
from models.export import to_plain
from training.config import TrainConfig
from training.publish import evaluate_onnx, export_run, record_accuracy


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


@dataclass(frozen=True)
class FinalEvaluation:
    """The end of a run: accuracies, where they come from, and what they cost.

    Attributes:
        accuracy: ``clean_accuracy``, ``certified_accuracy`` (and the audit's figures when
            evaluated in torch).
        bounds: the audited ``lipschitz_bound`` (body, head, lower) and ``certificate``: the ONNX
            file's metadata, or the torch audit.
        onnx: the exported file (None without export).
    """

    accuracy: dict[str, Any]
    bounds: dict[str, Any]
    onnx: Path | None
    export_time_s: float
    eval_time_s: float


def final_evaluation(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    run_dir: Path,
    device: torch.device,
    training: dict[str, Any],
) -> FinalEvaluation:
    """Export, audit and evaluate the trained model (``cfg.export``), or audit it in torch.

    Args:
        training: ``train_time_s``, ``epochs``, ``steps`` for the file's metadata.
    """
    if not cfg.export:
        t_eval = time.perf_counter()
        acc = evaluate_torch(model, data, cfg, device, full=True)
        return FinalEvaluation(acc, acc, None, 0.0, time.perf_counter() - t_eval)
    t_export = time.perf_counter()
    onnx_path = export_run(model, data, cfg, run_dir, training)
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
    record_accuracy(onnx_path, acc)  # the accuracies go into the file too
    return FinalEvaluation(acc, meta, onnx_path, export_time, eval_time)


def curvature_accuracy(
    model: nn.Module, data: Dataset, cfg: TrainConfig, body_bound: float
) -> dict[str, float]:
    """The CRC-Lip head's curvature certificate (needs the features: python only, not served)."""
    return curvature_certified_accuracy(
        to_plain(copy.deepcopy(model).cpu()), data.test_images, data.test_labels,
        cfg.eval_eps, body_bound=body_bound,
    )
