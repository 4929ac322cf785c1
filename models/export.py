"""Export: the plain inference network, and one self-checking, audited ONNX file per model.

``to_onnx`` writes a single self-contained ONNX file (no external data; opset
:data:`OPSET`; input ``image`` float32 ``(N, C, H, W)`` in [0, 1] with a dynamic batch axis;
output ``logits``) through the ``torch.export``-based exporter (``dynamo=True``). The exporter's
graph optimizer is left off: it merges initializers that happen to be equal (for example
Dirac-initialized kernels or zero biases), which would break the one-to-one mapping between
initializer names and the plain network's ``state_dict`` keys that :func:`load_twin` relies on;
ONNX Runtime applies the same fusions itself when it opens the session.

Before writing, the plain network is audited (:func:`certify.audit.audit`) at the input shape;
the bound, its split into body and head, the certificate kind and everything a server needs go
into ``metadata_props`` (see :data:`METADATA_KEYS`). Afterwards the file is checked with
``onnx.checker.check_model(full_check=True)`` and ONNX Runtime is compared with torch on random
inputs (max |Δ| <= :data:`PARITY_ATOL`, else :class:`ExportError`).

Weights hash (``weights_sha256``): sha256 over every initializer sorted by name, then every
``Constant`` node's tensor sorted by its output name; each tensor contributes
``name NUL data_type NUL dims(comma separated) NUL raw little-endian bytes``. Metadata is not part
of the hash, so it covers exactly the numbers the graph computes with.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Version of the metadata layout below; bump on incompatible changes.
LIPCERT_FORMAT = "1"
#: ONNX opset of exported models.
OPSET = 19
#: Max |ONNX Runtime − torch| tolerated on the logits at export and when loading a twin.
PARITY_ATOL = 1e-4
INPUT_NAME, OUTPUT_NAME = "image", "logits"

#: Keys written by :func:`to_onnx` (values are strings; JSON for lists and dicts).
METADATA_KEYS: tuple[str, ...] = (
    "lipcert_format", "method", "size", "dataset", "classes", "num_classes", "input_shape",
    "mean", "lipschitz_bound", "lipschitz_bound_body", "lipschitz_bound_head", "lipschitz_lower",
    "certificate", "head_distances", "audit", "config", "weights_sha256", "torch_version",
    "onnx_version", "onnxruntime_version", "opset",
)
#: Keys a caller may not set through ``metadata`` (computed here).
_COMPUTED = set(METADATA_KEYS) - {"dataset", "classes"}
_REQUIRED = (
    "lipcert_format", "method", "size", "classes", "input_shape", "lipschitz_bound",
    "lipschitz_bound_body", "lipschitz_bound_head", "certificate", "config", "weights_sha256",
)
_STRING_KEYS = {
    "lipcert_format", "method", "size", "dataset", "certificate", "weights_sha256",
    "torch_version", "onnx_version", "onnxruntime_version",
}
CERTIFICATES = ("generic", "linear_head", "pairwise")
#: Certificates that divide by the body bound and use the ``head_distances`` matrix.
HEAD_CERTIFICATES = ("linear_head", "pairwise")


class ExportError(RuntimeError):
    """The exported file does not reproduce the torch model (parity or checker failure)."""


class ModelVerificationError(ValueError):
    """An ONNX file is not a valid lipcert model: metadata missing or wrong, or hash mismatch."""


# -- plain network -----------------------------------------------------------------------------
def to_plain(model: nn.Module) -> nn.Module:
    """The plain inference network ``model.export()``, in eval mode, without gradients.

    The model is exported in eval mode (layers may refine estimates there) and its own mode is
    restored afterwards.
    """
    if not hasattr(model, "export"):
        raise TypeError(f"{type(model).__name__} has no export(); expected a LipNet or a layer")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            plain = model.export()
    finally:
        model.train(was_training)
    plain.eval()
    plain.requires_grad_(False)
    return plain


# -- hashing and metadata ----------------------------------------------------------------------
def _tensor_digest_parts(name: str, tensor: Any) -> bytes:
    from onnx import numpy_helper

    arr = numpy_helper.to_array(tensor)
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    head = f"{name}\0{tensor.data_type}\0{','.join(map(str, tensor.dims))}\0".encode()
    return head + np.ascontiguousarray(arr).tobytes()


def weights_sha256(onnx_model: Any) -> str:
    """sha256 of an ONNX model's weights in the canonical order described in the module doc.

    Args:
        onnx_model: an ``onnx.ModelProto``.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    graph = onnx_model.graph
    for init in sorted(graph.initializer, key=lambda t: t.name):
        h.update(_tensor_digest_parts(init.name, init))
    constants = []
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants.append((node.output[0], attr.t))
    for name, tensor in sorted(constants, key=lambda c: c[0]):
        h.update(_tensor_digest_parts(name, tensor))
    return h.hexdigest()


def _encode(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)


def _decode(key: str, value: str) -> Any:
    if key in _STRING_KEYS:
        return value
    try:
        return json.loads(value)
    except (json.JSONDecodeError, ValueError):
        return value


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata_props`` of an ONNX file, decoded (JSON values parsed, numbers as numbers).

    Only the model header is parsed; the weights are not loaded into memory twice.

    Raises:
        ModelVerificationError: the path is missing or not an ONNX file.
    """
    model = _load_onnx_proto(path)
    return {p.key: _decode(p.key, p.value) for p in model.metadata_props}


def _load_onnx_proto(path: str | Path) -> Any:
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ModelVerificationError(f"no such file: {p}")
    try:
        return onnx.load(str(p))
    except Exception as exc:  # protobuf raises several types on garbage
        raise ModelVerificationError(f"{p} is not an ONNX file ({type(exc).__name__})") from exc


def verify(path: str | Path, *, max_bound: float | None = None) -> dict[str, Any]:
    """Check that a file is a consistent lipcert model and return its decoded metadata.

    Checks: the lipcert format version, the required keys, the weights hash against the file's
    weights, bounds finite and positive with ``whole >= body · head``, a known certificate kind
    (with a ``num_classes × num_classes`` ``head_distances`` for ``linear_head`` and
    ``pairwise``), and the graph's
    input/output names and shape against ``input_shape``.

    Args:
        path: the ONNX file.
        max_bound: if given, also refuse models whose ``lipschitz_bound`` exceeds it.

    Returns:
        The decoded metadata (as :func:`read_metadata`).

    Raises:
        ModelVerificationError: with a message naming the file and the failed check.
    """
    model = _load_onnx_proto(path)
    meta = {p.key: _decode(p.key, p.value) for p in model.metadata_props}

    def fail(msg: str) -> ModelVerificationError:
        return ModelVerificationError(f"{path}: {msg}")

    if "lipcert_format" not in meta:
        raise fail("no lipcert metadata (not exported by models.export.to_onnx)")
    if str(meta["lipcert_format"]) != LIPCERT_FORMAT:
        raise fail(
            f"lipcert_format {meta['lipcert_format']!r}; this version reads {LIPCERT_FORMAT}"
        )
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise fail(f"metadata lacks {', '.join(missing)}")
    digest = weights_sha256(model)
    if digest != meta["weights_sha256"]:
        raise fail(
            f"weights_sha256 mismatch: file has {digest}, "
            f"metadata says {meta['weights_sha256']}"
        )
    bounds = {}
    for key in ("lipschitz_bound", "lipschitz_bound_body", "lipschitz_bound_head"):
        value = meta[key]
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise fail(f"{key} must be a finite positive number, got {value!r}")
        bounds[key] = float(value)
    if bounds["lipschitz_bound"] < (
        bounds["lipschitz_bound_body"] * bounds["lipschitz_bound_head"] * (1 - 1e-12)
    ):
        raise fail("lipschitz_bound is below lipschitz_bound_body * lipschitz_bound_head")
    if max_bound is not None and bounds["lipschitz_bound"] > max_bound:
        raise fail(f"lipschitz_bound {bounds['lipschitz_bound']} exceeds the allowed {max_bound}")
    classes = meta["classes"]
    if not isinstance(classes, list) or len(classes) < 2:
        raise fail(f"classes must be a JSON list of >= 2 names, got {classes!r}")
    if meta["certificate"] not in CERTIFICATES:
        raise fail(
            f"unknown certificate {meta['certificate']!r}; "
            f"choose from {', '.join(CERTIFICATES)}"
        )
    if meta["certificate"] in HEAD_CERTIFICATES:
        dist = np.asarray(meta.get("head_distances"), dtype=np.float64)
        if (
            dist.shape != (len(classes), len(classes))
            or not np.isfinite(dist).all()
            or (dist < 0).any()
        ):
            raise fail(
                f"head_distances must be a {len(classes)}x{len(classes)} non-negative matrix"
            )
    graph = model.graph
    if (
        [i.name for i in graph.input] != [INPUT_NAME]
        or [o.name for o in graph.output] != [OUTPUT_NAME]
    ):
        raise fail(f"graph must have input {INPUT_NAME!r} and output {OUTPUT_NAME!r}")
    dims = [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    if list(dims[1:]) != list(meta["input_shape"]):
        raise fail(f"graph input {dims} does not match input_shape {meta['input_shape']}")
    return meta


def certificate_kwargs(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`certify.certified_radius` for a model's metadata.

    ``linear_head`` and ``pairwise``: the body bound and the head's ``head_distances`` (row
    distances, or Lipschitz constants of the logit differences); ``generic``: the whole bound.
    """
    if meta["certificate"] in HEAD_CERTIFICATES:
        return dict(
            lipschitz_bound=float(meta["lipschitz_bound_body"]),
            head_distances=np.asarray(meta["head_distances"], dtype=np.float64),
        )
    return dict(lipschitz_bound=float(meta["lipschitz_bound"]))


# -- export ------------------------------------------------------------------------------------
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


def _session(path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(
        str(path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
    )


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


def to_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_shape: Sequence[int] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Export a LipNet to one audited, self-checked ONNX file.

    Args:
        model: a ``LipNet`` (has ``export()`` and ``config``).
        path: where to write the ``.onnx`` file (parents are created).
        input_shape: ``(C, H, W)``; defaults to the model config's input.
        metadata: extra ``metadata_props``: ``dataset``, ``classes`` (list of names), clean and
            certified accuracy, training time, ... Non-string values are stored as JSON. Keys
            computed here (bounds, hash, config, ...) may not be passed.

    Returns:
        The path written.

    Raises:
        ValueError: bad input shape or reserved metadata keys.
        ExportError: the checker or the ONNX Runtime parity check failed.
    """
    import onnx
    import onnxruntime

    from certify.audit import audit

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

    plain = to_plain(model)
    result = audit(plain, shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0))
    # The exporter reports progress on stdout; library code stays quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            plain, (example,), str(path), dynamo=True, optimize=False, external_data=False,
            opset_version=OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: "batch"},), verbose=False,
        )
    proto = onnx.load(str(path))
    names = {t.name for t in proto.graph.initializer}
    lost = [k for k in plain.state_dict() if k not in names]
    if lost:
        raise ExportError(f"the exporter renamed or merged weights {lost[:5]}; cannot build a twin")

    props: dict[str, Any] = {
        "lipcert_format": LIPCERT_FORMAT,
        "method": config["method"],
        "size": config["size"],
        "dataset": extra.pop("dataset", "unknown"),
        "classes": classes,
        "num_classes": num_classes,
        "input_shape": list(shape),
        "mean": config.get("mean"),
        "lipschitz_bound": float(result.bound),
        "lipschitz_bound_body": float(result.body_bound),
        "lipschitz_bound_head": float(result.head_bound),
        "lipschitz_lower": result.lower,
        "certificate": result.certificate,
        "audit": {k: v for k, v in result.to_dict().items() if k != "layers"},
        "config": config,
        "weights_sha256": weights_sha256(proto),
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "opset": OPSET,
    }
    if result.head_pairs is not None:
        props["head_distances"] = np.asarray(result.head_pairs, dtype=np.float64).tolist()
    props.update(extra)
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, _encode(value)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    if not any(op.domain in ("", "ai.onnx") and op.version >= OPSET for op in proto.opset_import):
        raise ExportError(f"exported opset {list(proto.opset_import)} is below {OPSET}")

    delta = _parity(_session(path), plain, shape)
    if not delta <= PARITY_ATOL:
        raise ExportError(f"ONNX Runtime differs from torch by {delta:.3g} > {PARITY_ATOL}")
    logger.info(
        "exported %s: bound %.6f (%s), parity %.2g", path, result.bound, result.certificate, delta
    )
    return path


# -- loading -----------------------------------------------------------------------------------
def load_onnx(
    path: str | Path,
    *,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    max_bound: float | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Verify a lipcert ONNX file and open an ONNX Runtime session on it.

    Args:
        path: the ``.onnx`` file.
        providers: ONNX Runtime execution providers (default CPU).
        threads: intra-op threads (default: ONNX Runtime's choice).
        max_bound: passed to :func:`verify`.

    Returns:
        ``(session, metadata)``.

    Raises:
        ModelVerificationError: see :func:`verify`.
    """
    meta = verify(path, max_bound=max_bound)
    return _session(path, providers, threads), meta


def load_twin(path: str | Path, *, session: Any = None) -> nn.Module:
    """A torch module computing exactly what the ONNX file computes (for attacks and audits).

    Rebuilds the plain network from the stored LipNet config (``create_model(...).export()``),
    loads every ``state_dict`` entry from the initializer of the same name, and checks it against
    ONNX Runtime on random inputs.

    Args:
        path: the ``.onnx`` file.
        session: an open session on it (one is created otherwise).

    Returns:
        The plain module, eval mode, no gradients.

    Raises:
        ModelVerificationError: missing metadata or weights that do not fit the config.
        ExportError: the twin disagrees with ONNX Runtime.
    """
    from onnx import numpy_helper

    from models.registry import create_model

    proto = _load_onnx_proto(path)
    meta = {p.key: _decode(p.key, p.value) for p in proto.metadata_props}
    if "config" not in meta or "input_shape" not in meta:
        raise ModelVerificationError(f"{path}: no lipcert config in the metadata")
    cfg = dict(meta["config"])
    model = create_model(
        cfg.pop("method"), cfg.pop("size"), cfg.pop("in_channels"), cfg.pop("num_classes"),
        cfg.pop("image_size"), **cfg,
    )
    twin = to_plain(model)
    inits = {t.name: t for t in proto.graph.initializer}
    state = {}
    for key, ref in twin.state_dict().items():
        if key not in inits:
            raise ModelVerificationError(f"{path}: no initializer {key!r} for the twin")
        value = torch.from_numpy(numpy_helper.to_array(inits[key]).copy())
        if value.shape != ref.shape:
            raise ModelVerificationError(
                f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
            )
        state[key] = value.to(ref.dtype)
    twin.load_state_dict(state, strict=True)
    twin.eval().requires_grad_(False)
    session = session if session is not None else _session(path)
    delta = _parity(session, twin, tuple(meta["input_shape"]), seed=1)
    if not delta <= PARITY_ATOL:
        raise ExportError(f"{path}: torch twin differs from ONNX Runtime by {delta:.3g}")
    return twin


__all__ = [
    "CERTIFICATES", "ExportError", "HEAD_CERTIFICATES", "LIPCERT_FORMAT", "METADATA_KEYS",
    "ModelVerificationError", "OPSET", "PARITY_ATOL", "certificate_kwargs", "load_onnx",
    "load_twin", "read_metadata", "to_onnx", "to_plain", "verify", "weights_sha256",
]
