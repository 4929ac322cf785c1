"""ONNX Runtime sessions for artifacts: lipcert's fixed provider options, batched logits.

CUDA always runs with TF32 off (whatever ``LIPCERT_PROVIDERS`` asks for): TF32 rounds matmul
inputs to 10 mantissa bits, an error well beyond the radius' floating-point slack.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from certify.artifact.format import INPUT_NAME, OUTPUT_NAME, ExportError


def default_providers(cuda: bool = True) -> list[str]:
    """CUDA then CPU where ONNX Runtime has CUDA and a GPU device node exists (and ``cuda``);
    else CPU. onnxruntime-gpu lists CUDA even on machines without a GPU, then logs errors at
    every session: the device node is a cheap, import-free sign that one is there."""
    import onnxruntime as ort

    if (cuda and "CUDAExecutionProvider" in ort.get_available_providers()
            and Path("/dev/nvidiactl").exists()):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def provider_options(providers: Sequence[str] | None) -> list[tuple[str, dict[str, str]]]:
    """ONNX Runtime providers with lipcert's fixed options, whatever the caller asked for.

    CUDA runs with TF32 off: TF32 rounds matmul inputs to 10 mantissa bits, an error well beyond
    the radius' floating-point slack. Unknown provider names are passed through unchanged (ONNX
    Runtime then refuses them).
    """
    out = []
    for name in providers or ["CPUExecutionProvider"]:
        if name == "CUDAExecutionProvider":
            out.append((name, {"use_tf32": "0"}))
        else:
            out.append((name, {}))
    return out


def open_session(
    model: bytes | str | Path, providers: Sequence[str] | None = None, threads: int | None = None
) -> Any:
    """An ONNX Runtime session on model bytes (or a path), with :func:`provider_options`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options,
                                providers=provider_options(providers))


def run_logits(session: Any, images: Any, batch: int = 256) -> np.ndarray:
    """Logits ``(N, classes)`` float32 of ``images`` (uint8 in [0, 255] or float in [0, 1])."""
    arr = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    if len(arr) == 0:
        raise ValueError("no images to evaluate")
    out = []
    for i in range(0, len(arr), batch):
        x = arr[i : i + batch]
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        out.append(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
    return np.concatenate(out)


def _parity(session: Any, module: nn.Module, shape: tuple[int, ...], seed: int = 0) -> float:
    """Max |ORT − torch| on random [0, 1] batches of sizes 1 and 5 (checks the dynamic axis)."""
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in (1, 5):
        x = torch.rand((batch, *shape), generator=gen)
        with torch.no_grad():
            ref = module(x).numpy()
        (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        if out.shape != ref.shape:
            raise ExportError(f"ONNX output shape {out.shape} != torch {ref.shape}")
        worst = max(worst, float(np.abs(out - ref).max()))
    return worst


__all__ = ["default_providers", "open_session", "provider_options", "run_logits"]
