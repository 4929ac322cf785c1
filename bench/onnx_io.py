"""Export a LipNet to ONNX and open ONNX Runtime sessions for the benchmarks."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_shape: tuple[int, int, int],
    metadata: dict[str, Any] | None = None,
) -> tuple[Path, str]:
    """Write ``model`` as ONNX (input ``image`` ``[N, C, H, W]`` with dynamic N, output ``logits``).

    Uses the project's ``models.export.to_onnx`` when it exists and accepts the model; otherwise
    exports the plain module ``model.export()`` with the TorchScript-based ``torch.onnx.export``
    (opset 17), which traces the plain ops the layers export to.

    Args:
        model: a LipNet (has ``export()``).
        path: destination file.
        input_shape: ``(C, H, W)``.
        metadata: passed to ``to_onnx``; ignored by the fallback.

    Returns:
        ``(path, exporter)`` where exporter names the code path used.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from models.export import to_onnx
    except ImportError:
        to_onnx = None
    if to_onnx is not None:
        try:
            out = to_onnx(
                model, path, input_shape=tuple(input_shape), metadata=dict(metadata or {})
            )
            return Path(out), "models.export.to_onnx"
        except (TypeError, ValueError, NotImplementedError) as err:
            # Benchmarks run on untrained models; an exporter that insists on training metadata
            # or an audit must not stop the timing, so fall back and say so.
            log.warning("models.export.to_onnx refused (%s); using bench's plain export", err)
    plain = model.export().eval()
    x = torch.rand(2, *input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings of the legacy exporter
        torch.onnx.export(
            plain, (x,), str(path), input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
            dynamo=False,
        )
    return path, "torch.onnx.export(model.export())"


def ort_session(path: str | Path, *, device: str = "cpu", threads: int | None = None):
    """An ONNX Runtime session with full graph optimization.

    Args:
        path: the ``.onnx`` file.
        device: ``"cuda"`` asks for the CUDA provider first (falls back to CPU if absent).
        threads: intra-op threads (default: ``torch.get_num_threads()``, the same as eager torch).

    Returns:
        ``onnxruntime.InferenceSession``.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
