"""Export: a trained LipNet to one audited ONNX file that passes the load it will meet.

The file's graph is the export of the *skeleton* of the model's config (the same graph a load
compares against, cached per process) with the trained network's weights in its initializers;
ONNX Runtime on the file is then checked against the trained network on random inputs. A model
that does not match its own config therefore fails here, not at a server.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certify.artifact.format import (
    _COMPUTED,
    LIPCERT_FORMAT,
    PARITY_ATOL,
    ExportError,
    ModelVerificationError,
    _parse,
    _read_bytes,
    _save,
    encode_value,
    weights_sha256,
)
from certify.artifact.load import _audit_metadata, load
from certify.artifact.runtime import _parity
from certify.artifact.structure import OPSET, graft, skeleton_proto
from certify.audit import audit
from models.export import to_plain
from models.graph_form import CURRENT, check_form

logger = logging.getLogger(__name__)

def _input_shape(model: nn.Module, input_shape: Sequence[int] | None) -> tuple[int, int, int]:
    config = getattr(model, "config", None)
    if input_shape is None:
        if config is None:
            raise ValueError("input_shape is required for a model without .config")
        input_shape = (config["in_channels"], config["image_size"], config["image_size"])
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    return shape  # type: ignore[return-value]


def to_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_shape: Sequence[int] | None = None,
    metadata: Mapping[str, Any] | None = None,
    graph_form: int = CURRENT,
) -> Path:
    """Export a LipNet to one audited ONNX file, then prove it loads (:func:`load`).

    The graph is the (per-process cached) export of the skeleton of ``model.config`` with the
    model's materialized weights grafted into its initializers, so the file is, by
    construction, what a server's re-audit rebuilds; ONNX Runtime on it must then match the
    model itself within :data:`PARITY_ATOL` on random inputs.

    Args:
        model: a ``LipNet`` (has ``export()`` and ``config``).
        path: where to write the ``.onnx`` file (parents are created).
        input_shape: ``(C, H, W)``; defaults to the model config's input.
        metadata: extra ``metadata_props``: ``dataset``, ``classes`` (list of names), clean and
            certified accuracy, training time, ... Non-string values are stored as JSON. Keys
            computed here (bounds, hash, config, ...) may not be passed.
        graph_form: the ONNX operators to write (:mod:`models.graph_form`): 3 (default) pads
            with ``Pad(mode="wrap")`` and writes CPL's and SLL's adjoint as a ``Conv``; 2 keeps
            their ``ConvTranspose``; 1 pads with slices and concatenations, for a runtime
            without the opset-19 wrap pad. The function, the bound and the certificate are the
            same.

    Returns:
        The path written.

    Raises:
        ValueError: bad input shape, reserved metadata keys or an unknown graph form.
        ExportError: the checker, the re-audit or the ONNX Runtime parity check failed.
    """
    import onnx
    import onnxruntime

    path = Path(path)
    extra = dict(metadata or {})
    reserved = sorted(set(extra) & _COMPUTED)
    if reserved:
        raise ValueError(f"metadata keys {reserved} are computed by to_onnx; remove them")
    config = dict(getattr(model, "config", {}) or {})
    if not config:
        raise ValueError(f"{type(model).__name__} has no .config; to_onnx exports LipNet models")
    shape = _input_shape(model, input_shape)
    num_classes = int(config["num_classes"])
    classes = list(extra.pop("classes", [str(i) for i in range(num_classes)]))
    if len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for {num_classes} classes")

    check_form(graph_form)
    plain = to_plain(model)
    result = audit(plain, shape)
    try:
        proto = graft(skeleton_proto(config, shape, form=graph_form), plain)
    except ValueError as exc:
        raise ExportError(
            f"{exc}: the model does not match its own config, so no server could rebuild it"
        ) from None
    props: dict[str, Any] = {
        "lipcert_format": LIPCERT_FORMAT,
        "method": config["method"],
        "size": config["size"],
        "dataset": extra.pop("dataset", "unknown"),
        "classes": classes,
        "num_classes": num_classes,
        "input_shape": list(shape),
        "mean": config.get("mean"),
        **_audit_metadata(result),
        "lipschitz_lower": result.lower,
        "audit": {k: v for k, v in result.to_dict().items() if k != "layers"},
        "config": config,
        "weights_sha256": weights_sha256(proto),
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "opset": OPSET,
        **extra,
    }
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, encode_value(value)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the ONNX checker refuses the export: {exc}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(proto, path)
    try:
        artifact = load(path, threads=1)  # the file must pass the very check a server runs
    except ModelVerificationError as exc:
        raise ExportError(f"the exported file does not re-audit: {exc}") from None
    delta = _parity(artifact.session, plain, shape)
    if not delta <= PARITY_ATOL:
        raise ExportError(f"ONNX Runtime differs from torch by {delta:.3g} > {PARITY_ATOL}")
    logger.info(
        "exported %s: bound %.6f (%s), parity %.2g", path, result.bound, result.certificate, delta
    )
    return path


def update_metadata(path: str | Path, extra: Mapping[str, Any]) -> None:
    """Add or replace informational ``metadata_props`` (e.g. measured accuracy) in a file.

    The graph and the weights are untouched; audit-derived keys may not be changed here.
    """
    reserved = sorted(set(extra) & _COMPUTED)
    if reserved:
        raise ValueError(f"metadata keys {reserved} are computed by to_onnx; remove them")
    path = Path(path)
    proto = _parse(_read_bytes(path), str(path))
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in extra.items():
        entry = existing.get(key) or proto.metadata_props.add()
        entry.key, entry.value = key, encode_value(value)
    _save(proto, path)


__all__ = ["to_onnx", "update_metadata"]
