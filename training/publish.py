"""The run's artifact: export the trained model as an audited ONNX file, evaluate that file, and
save it to the BentoML model store. Every call into the artifact module is here, one function
each, so the training package has a single place that knows the file format."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certify.artifact import default_providers, load, to_onnx, update_metadata
from certify.radius import certified_accuracy
from data import Dataset
from training.config import TrainConfig


def export_run(
    model: nn.Module, data: Dataset, cfg: TrainConfig, run_dir: Path, training: dict[str, Any]
) -> Path:
    """Write ``run_dir/model.onnx``: the audited plain network with the run's metadata.

    Args:
        training: ``train_time_s``, ``epochs``, ``steps`` for the metadata.
    """
    return to_onnx(
        copy.deepcopy(model).cpu(),
        run_dir / "model.onnx",
        input_shape=data.input_shape,
        metadata=dict(dataset=cfg.dataset, classes=list(data.classes), **training),
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

    The file is loaded as the service loads it (re-audited); the certificate uses the proven
    bound and head distances. ``cuda``: use ONNX Runtime's CUDA provider if it has one.

    Returns:
        ``(accuracy, metadata)``; accuracy: ``{"clean_accuracy", "certified_accuracy"}``.
    """
    artifact = load(path, providers=default_providers(cuda))
    logits = artifact.logits(images, batch)
    meta = artifact.metadata
    acc = certified_accuracy(logits, labels.numpy(), eps, **artifact.certificate_kwargs())
    clean = acc.pop("clean")
    return dict(clean_accuracy=clean, certified_accuracy=acc), meta


def record_accuracy(path: Path, accuracy: dict[str, Any]) -> None:
    """Add the accuracies to the file's metadata (the weights and their hash are kept)."""
    update_metadata(
        path,
        dict(
            clean_accuracy=accuracy["clean_accuracy"],
            certified_accuracy=accuracy["certified_accuracy"],
        ),
    )


def store_run(onnx_path: Path, report: dict[str, Any]) -> str:
    """Save the file to the BentoML model store, labelled from ``report``; returns the tag."""
    from certify.artifact.store import save_to_store

    return save_to_store(onnx_path, report)
