"""Export a LipNet to ONNX and open ONNX Runtime sessions for the benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_shape: tuple[int, int, int],
    metadata: dict[str, Any] | None = None,
) -> tuple[Path, str]:
    """Write ``model`` as the audited lipcert ONNX file the service would load.

    Args:
        model: a LipNet (has ``export()`` and ``config``).
        path: destination file.
        input_shape: ``(C, H, W)``.
        metadata: extra ``metadata_props`` (see :func:`certify.artifact.to_onnx`).

    Returns:
        ``(path, exporter)``; exporter names the code path, recorded with each bench row.
    """
    from certify.artifact import to_onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = to_onnx(model, path, input_shape=tuple(input_shape), metadata=dict(metadata or {}))
    return Path(out), "certify.artifact.to_onnx"


def ort_session(path: str | Path, *, device: str = "cpu", threads: int | None = None):
    """An ONNX Runtime session as the service opens one (:func:`certify.artifact.open_session`).

    Args:
        path: the ``.onnx`` file.
        device: ``"cuda"`` asks for the CUDA provider first (falls back to CPU if absent).
        threads: intra-op threads (default: ``torch.get_num_threads()``, the same as eager torch).

    Returns:
        ``onnxruntime.InferenceSession``.
    """
    from certify.artifact import default_providers, open_session

    return open_session(path, default_providers(device.startswith("cuda")),
                        int(threads or torch.get_num_threads()))
