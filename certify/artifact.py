"""The certified artifact: one audited ONNX file per model — its format, export, and load.

**Format.** A single self-contained ONNX file (opset :data:`OPSET`, no external data); input
``image`` float32 ``(N, C, H, W)`` in [0, 1] with a dynamic batch axis; output ``logits``.
``metadata_props`` carry the keys of :data:`METADATA_KEYS` (strings; JSON for lists and dicts):
what the model is (method, size, dataset, classes, config), what the audit found when it was
exported (bounds, certificate, head distances), versions, and ``weights_sha256`` (sha256 over
every initializer sorted by name, then every ``Constant`` node's tensor sorted by output name;
each contributes ``name NUL data_type NUL dims NUL raw little-endian bytes``).

**Metadata is information, never trusted.** :func:`load` reads the file's bytes once and derives
the certificate from the graph those bytes hold (see :mod:`certify.structure`):

1. rebuild the plain network of the stored config and load its weights from the file (the twin);
2. require the file's graph to be *structurally identical* to the export of that network;
3. audit the twin (:func:`certify.audit.audit`): the bound, head distances and certificate kind
   the radius uses come from here;
4. cross-check the metadata against 2–3 (hash, bounds, certificate, head distances, classes, input
   shape): any mismatch refuses the file, because a file that lies about itself is not trusted;
5. open the ONNX Runtime session from the same bytes (CUDA with TF32 off, whatever the providers
   are) and check it against the twin on random inputs.

With ``LIPCERT_SIGNING_KEY`` set, :func:`to_onnx` and :func:`update_metadata` sign the whole file
(HMAC-SHA256 over graph, weights and metadata) and :func:`load` refuses unsigned or altered files.

Anything not proven raises :class:`ModelVerificationError` with a one-line reason.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from certify.audit import AuditResult, audit
from certify.radius import certified_radius, slack_for_provider
from certify.structure import (
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    build_skeleton,
    export_proto,
    skeleton_proto,
    structure_mismatch,
)
from models.export import to_plain

logger = logging.getLogger(__name__)

#: Version of the metadata layout; bump on incompatible changes.
LIPCERT_FORMAT = "1"
#: Max |ONNX Runtime − torch| tolerated on the logits at export and at load.
PARITY_ATOL = 1e-4
#: Relative tolerance of the metadata's bounds against the re-audit (thread counts may change
#: the last bits of an SVD; anything larger is a file that lies about itself).
BOUND_RTOL = 1e-6
#: Environment variable holding the signing key (optional deployment hardening).
SIGNING_KEY_ENV = "LIPCERT_SIGNING_KEY"
SIGNATURE_KEY = "lipcert_signature"

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
    "torch_version", "onnx_version", "onnxruntime_version", SIGNATURE_KEY,
}
CERTIFICATES = ("generic", "linear_head", "pairwise")
#: Certificates that divide by the body bound and use the ``head_distances`` matrix.
HEAD_CERTIFICATES = ("linear_head", "pairwise")


class ExportError(RuntimeError):
    """The exported file does not reproduce the torch model (parity or checker failure)."""


class ModelVerificationError(ValueError):
    """A file that is not a proven lipcert model; the message says why, in one line."""


# -- metadata ----------------------------------------------------------------------------------
def _tensor_digest_parts(name: str, tensor: Any) -> bytes:
    from onnx import numpy_helper

    arr = numpy_helper.to_array(tensor)
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    head = f"{name}\0{tensor.data_type}\0{','.join(map(str, tensor.dims))}\0".encode()
    return head + np.ascontiguousarray(arr).tobytes()


def weights_sha256(onnx_model: Any) -> str:
    """sha256 of an ``onnx.ModelProto``'s weights in the canonical order of the module doc."""
    h = hashlib.sha256()
    graph = onnx_model.graph
    for init in sorted(graph.initializer, key=lambda t: t.name):
        h.update(_tensor_digest_parts(init.name, init))
    constants = [
        (node.output[0], attr.t)
        for node in graph.node if node.op_type == "Constant"
        for attr in node.attribute if attr.name == "value"
    ]
    for name, tensor in sorted(constants, key=lambda c: c[0]):
        h.update(_tensor_digest_parts(name, tensor))
    return h.hexdigest()


def encode_value(value: Any) -> str:
    """A metadata value as stored: strings as is, floats by ``repr``, the rest as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)


def decode_value(key: str, value: str) -> Any:
    """Inverse of :func:`encode_value` (string keys stay strings; others parsed as JSON)."""
    if key in _STRING_KEYS:
        return value
    try:
        return json.loads(value)
    except (json.JSONDecodeError, ValueError):
        return value


def decode_metadata(proto: Any) -> dict[str, Any]:
    """The decoded ``metadata_props`` of an ``onnx.ModelProto``."""
    return {p.key: decode_value(p.key, p.value) for p in proto.metadata_props}


def _parse(data: bytes, source: str) -> Any:
    import onnx

    try:
        return onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises several types on garbage
        message = f"{source} is not an ONNX file ({type(exc).__name__})"
        raise ModelVerificationError(message) from None


def _read_bytes(path: str | Path) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise ModelVerificationError(f"no such file: {p}") from None
    except OSError as exc:
        raise ModelVerificationError(f"cannot read {p}: {exc.strerror or exc}") from None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded metadata of an ONNX file (information only: nothing here is verified).

    Raises:
        ModelVerificationError: the path is missing or not an ONNX file.
    """
    return decode_metadata(_parse(_read_bytes(path), str(path)))


# -- signing -----------------------------------------------------------------------------------
def _signing_key(key: str | bytes | None) -> bytes | None:
    key = os.environ.get(SIGNING_KEY_ENV) if key is None else key
    if not key:
        return None
    return key.encode() if isinstance(key, str) else bytes(key)


def _signature(proto: Any, key: bytes) -> str:
    import onnx

    unsigned = onnx.ModelProto()
    unsigned.CopyFrom(proto)
    kept = [p for p in unsigned.metadata_props if p.key != SIGNATURE_KEY]
    del unsigned.metadata_props[:]
    unsigned.metadata_props.extend(kept)
    payload = unsigned.SerializeToString(deterministic=True)
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def _save(proto: Any, path: Path, signing_key: str | bytes | None = None) -> None:
    """Write ``proto`` to ``path`` in one piece, signed when a key is configured."""
    key = _signing_key(signing_key)
    kept = [p for p in proto.metadata_props if p.key != SIGNATURE_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    if key is not None:
        signature = _signature(proto, key)  # over the file without any signature entry
        entry = proto.metadata_props.add()
        entry.key, entry.value = SIGNATURE_KEY, signature
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(proto.SerializeToString())
    tmp.replace(path)


# -- sessions ----------------------------------------------------------------------------------
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


def _audit_metadata(result: AuditResult) -> dict[str, Any]:
    """The metadata entries that the audit determines (and :func:`load` re-derives)."""
    props: dict[str, Any] = {
        "lipschitz_bound": float(result.bound),
        "lipschitz_bound_body": float(result.body_bound),
        "lipschitz_bound_head": float(result.head_bound),
        "certificate": result.certificate,
    }
    if result.head_pairs is not None:
        props["head_distances"] = np.asarray(result.head_pairs, dtype=np.float64).tolist()
    return props


def to_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_shape: Sequence[int] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Export a LipNet to one audited ONNX file, then prove it loads (:func:`load`).

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

    plain = to_plain(model)
    result = audit(plain, shape)
    proto = export_proto(plain, shape)
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


# -- load = re-audit ---------------------------------------------------------------------------
@dataclass
class Artifact:
    """A loaded, re-audited model: the session that runs and the certificate proven for it.

    Attributes:
        source: where the bytes came from (a path, for messages).
        metadata: the file's decoded metadata, with the audit-derived entries (bounds,
            certificate, head distances) replaced by the values :func:`load` proved.
        audit: the re-audit of the twin.
        twin: the plain torch network the graph was proven to compute (eval, no gradients).
        session: the ONNX Runtime session, built from the verified bytes.
        onnx_bytes: the file's size.
        parameters: the number of weights in the graph's initializers.
    """

    source: str
    metadata: dict[str, Any]
    audit: AuditResult
    twin: nn.Module = field(repr=False)
    session: Any = field(repr=False)
    onnx_bytes: int = 0
    parameters: int = 0

    @property
    def provider(self) -> str:
        """The ONNX Runtime provider that runs the model."""
        return str(self.session.get_providers()[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.metadata["input_shape"])  # type: ignore[return-value]

    def certificate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`certify.certified_radius`, from the re-audit."""
        return {**self.audit.certificate_kwargs(), "slack_rel": slack_for_provider(self.provider)}

    def logits(self, images: Any, batch: int = 256) -> np.ndarray:
        """ONNX Runtime logits of ``images`` (uint8 or float in [0, 1], ``(N, C, H, W)``)."""
        return run_logits(self.session, images, batch)

    def radii(self, logits: Any) -> Any:
        """Certified L2 radii of these logits under the proven certificate."""
        return certified_radius(logits, **self.certificate_kwargs())


def _fail(source: str, message: str) -> ModelVerificationError:
    return ModelVerificationError(f"{source}: {message}")


def _check_schema(meta: Mapping[str, Any], source: str) -> None:
    if "lipcert_format" not in meta:
        raise _fail(source, "no lipcert metadata (not exported by certify.artifact.to_onnx)")
    if str(meta["lipcert_format"]) != LIPCERT_FORMAT:
        raise _fail(source, f"lipcert_format {meta['lipcert_format']!r}; this version reads "
                            f"{LIPCERT_FORMAT}")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise _fail(source, f"metadata lacks {', '.join(missing)}")
    classes = meta["classes"]
    if not isinstance(classes, list) or len(classes) < 2:
        raise _fail(source, f"classes must be a JSON list of >= 2 names, got {classes!r}")
    if meta.get("num_classes", len(classes)) != len(classes):
        raise _fail(source, f"num_classes {meta['num_classes']!r} but {len(classes)} classes")
    shape = meta["input_shape"]
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(s, int) and s > 0 for s in shape)):
        raise _fail(source, f"input_shape must be [C, H, W], got {shape!r}")
    config = meta["config"]
    if not isinstance(config, dict):
        raise _fail(source, "config is not a JSON object")
    for key in ("method", "size"):
        if config.get(key) != meta[key]:
            raise _fail(source, f"{key} {meta[key]!r} but the config says {config.get(key)!r}")
    if config.get("num_classes") != len(classes):
        raise _fail(source, f"{len(classes)} classes but the config has "
                            f"{config.get('num_classes')!r}")
    if config.get("in_channels") != shape[0]:
        raise _fail(source, f"input_shape {shape} but the config has "
                            f"{config.get('in_channels')!r} channels")
    if meta["certificate"] not in CERTIFICATES:
        raise _fail(source, f"unknown certificate {meta['certificate']!r}; choose from "
                            f"{', '.join(CERTIFICATES)}")


def _cross_check(meta: Mapping[str, Any], result: AuditResult, source: str) -> None:
    """Refuse a file whose metadata disagrees with what the re-audit proved."""
    derived = _audit_metadata(result)
    if meta["certificate"] != derived["certificate"]:
        raise _fail(source, f"certificate {meta['certificate']!r} but the graph proves "
                            f"{derived['certificate']!r}")
    for key in ("lipschitz_bound", "lipschitz_bound_body", "lipschitz_bound_head"):
        stated = meta[key]
        if (not isinstance(stated, (int, float)) or isinstance(stated, bool)
                or not math.isclose(float(stated), derived[key], rel_tol=BOUND_RTOL)):
            raise _fail(source, f"{key} {stated!r} but the re-audit of the graph gives "
                                f"{derived[key]:.9g}")
    if "head_distances" in derived:
        try:
            stated = np.asarray(meta.get("head_distances"), dtype=np.float64)
        except (TypeError, ValueError):
            stated = np.zeros(0)
        expected = np.asarray(derived["head_distances"])
        if stated.shape != expected.shape or not np.allclose(stated, expected, rtol=BOUND_RTOL,
                                                             atol=0.0):
            raise _fail(source, "head_distances differ from the re-audited head")
    elif meta.get("head_distances") is not None:
        raise _fail(source, "head_distances given but the graph has no head certificate")


def _external_data(tensor: Any) -> bool:
    return tensor.data_location == 1 or len(tensor.external_data) > 0  # 1: TensorProto.EXTERNAL


def _twin_state(proto: Any, twin: nn.Module) -> dict[str, torch.Tensor]:
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    return {key: torch.from_numpy(numpy_helper.to_array(inits[key]).copy())
            for key in twin.state_dict()}


def load_bytes(
    data: bytes,
    source: str = "<bytes>",
    *,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    max_bound: float | None = None,
    signing_key: str | bytes | None = None,
) -> Artifact:
    """:func:`load` on bytes already read (the session is built from these very bytes)."""
    try:
        return _load_bytes(data, source, providers, threads, max_bound, signing_key)
    except ModelVerificationError:
        raise
    except Exception as exc:  # a file that trips the loader is refused, never half-served
        logger.exception("%s: unexpected error while loading", source)
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise _fail(source, f"cannot be proven ({reason})") from None


def _load_bytes(
    data: bytes,
    source: str,
    providers: Sequence[str] | None,
    threads: int | None,
    max_bound: float | None,
    signing_key: str | bytes | None,
) -> Artifact:
    proto = _parse(data, source)
    external = [t.name for t in proto.graph.initializer if _external_data(t)]
    if external:
        raise _fail(source, f"initializer {external[0]!r} has external data; the file must be "
                            "self-contained")
    meta = decode_metadata(proto)
    _check_schema(meta, source)
    key = _signing_key(signing_key)
    if key is not None:
        stated = meta.get(SIGNATURE_KEY)
        if not isinstance(stated, str) or not hmac.compare_digest(stated, _signature(proto, key)):
            raise _fail(source, f"signature missing or wrong ({SIGNING_KEY_ENV} is set)")
    digest = weights_sha256(proto)
    if digest != meta["weights_sha256"]:
        raise _fail(source, f"weights_sha256 mismatch: file has {digest}, metadata says "
                            f"{meta['weights_sha256']}")
    graph = proto.graph
    if [i.name for i in graph.input] != [INPUT_NAME] or [o.name for o in graph.output] != [
        OUTPUT_NAME
    ]:
        raise _fail(source, f"graph must have input {INPUT_NAME!r} and output {OUTPUT_NAME!r}")
    shape = tuple(meta["input_shape"])
    try:
        twin = build_skeleton(meta["config"])
        reference = skeleton_proto(meta["config"], shape, twin)
    except Exception as exc:  # any failure to rebuild is a refusal, never a crash
        raise _fail(source, f"cannot rebuild the stored config: {exc}".splitlines()[0]) from None
    mismatch = structure_mismatch(proto, reference, list(twin.state_dict()))
    if mismatch is not None:
        raise _fail(source, f"graph is not the export of its config: {mismatch}")
    twin.load_state_dict(_twin_state(proto, twin), strict=True)
    twin.eval().requires_grad_(False)
    try:
        result = audit(twin, shape, lower=False)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise _fail(source, f"the audit refuses the graph: {exc}".splitlines()[0]) from None
    _cross_check(meta, result, source)
    if max_bound is not None and result.bound > max_bound:
        raise _fail(source, f"lipschitz_bound {result.bound} exceeds the allowed {max_bound}")
    try:
        session = open_session(data, providers, threads)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise _fail(source, f"ONNX Runtime cannot load it: {exc}".splitlines()[0]) from None
    delta = _parity(session, twin, shape, seed=1)
    if not delta <= PARITY_ATOL:
        raise _fail(source, f"ONNX Runtime differs from the audited twin by {delta:.3g}")
    meta.update(_audit_metadata(result))
    parameters = sum(int(np.prod(t.dims)) for t in graph.initializer)
    return Artifact(source, meta, result, twin, session, len(data), parameters)


def load(
    path: str | Path,
    *,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    max_bound: float | None = None,
    signing_key: str | bytes | None = None,
) -> Artifact:
    """Read a lipcert ONNX file once, re-audit the graph it holds and open a session on it.

    Args:
        path: the ``.onnx`` file.
        providers: ONNX Runtime providers (default CPU); see :func:`provider_options`.
        threads: ONNX Runtime intra-op threads (default: its choice).
        max_bound: refuse models whose re-audited whole-network bound exceeds it.
        signing_key: HMAC key the file must be signed with (default ``$LIPCERT_SIGNING_KEY``;
            no signature check when neither is set).

    Returns:
        The :class:`Artifact`.

    Raises:
        ModelVerificationError: anything not proven, with the reason in one line.
    """
    return load_bytes(_read_bytes(path), str(path), providers=providers, threads=threads,
                      max_bound=max_bound, signing_key=signing_key)


def verify(path: str | Path, *, max_bound: float | None = None) -> dict[str, Any]:
    """:func:`load` a file and return its metadata with the proven values (raises if refused)."""
    return load(path, max_bound=max_bound, threads=1).metadata


def certificate_kwargs(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`certify.certified_radius` for *verified* metadata.

    ``linear_head`` and ``pairwise``: the body bound and ``head_distances``; ``generic``: the
    whole bound. Only pass metadata returned by :func:`verify` or :attr:`Artifact.metadata`.
    """
    if meta["certificate"] in HEAD_CERTIFICATES:
        return dict(
            lipschitz_bound=float(meta["lipschitz_bound_body"]),
            head_distances=np.asarray(meta["head_distances"], dtype=np.float64),
        )
    return dict(lipschitz_bound=float(meta["lipschitz_bound"]))


def load_onnx(
    path: str | Path,
    *,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    max_bound: float | None = None,
) -> tuple[Any, dict[str, Any]]:
    """``(session, verified metadata)`` of a file: :func:`load`'s session and proven values."""
    artifact = load(path, providers=providers, threads=threads, max_bound=max_bound)
    return artifact.session, artifact.metadata


def open_unverified(path: str | Path) -> Artifact:
    """A file's twin, session and *stated* certificate, with no check at all.

    Only for testing the checks themselves (e.g. that the attack check flips a file whose
    metadata understates its weights). Never serve or report what this returns: its
    ``audit`` is rebuilt from the metadata's claims, not proven.
    """
    data = _read_bytes(path)
    proto = _parse(data, str(path))
    meta = decode_metadata(proto)
    twin = build_skeleton(meta["config"])
    twin.load_state_dict(_twin_state(proto, twin), strict=True)
    twin.eval().requires_grad_(False)
    stated = certificate_kwargs(meta)
    pairs = stated.get("head_distances")
    claimed = AuditResult(
        input_shape=tuple(meta["input_shape"]), rows=[],
        body_bound=float(meta["lipschitz_bound_body"]),
        head_bound=float(meta["lipschitz_bound_head"]), bound=float(meta["lipschitz_bound"]),
        certificate=str(meta["certificate"]), head_pairs=pairs,
    )
    return Artifact(str(path), meta, claimed, twin, open_session(data, threads=1), len(data))


def load_twin(path: str | Path) -> nn.Module:
    """The plain torch network a file is proven to compute (for attacks and audits)."""
    return load(path, threads=1).twin


__all__ = [
    "CERTIFICATES", "HEAD_CERTIFICATES", "INPUT_NAME", "LIPCERT_FORMAT", "METADATA_KEYS",
    "OPSET", "OUTPUT_NAME", "PARITY_ATOL", "SIGNING_KEY_ENV", "Artifact", "ExportError",
    "ModelVerificationError", "certificate_kwargs", "decode_metadata", "decode_value",
    "encode_value", "load", "load_bytes", "load_onnx", "load_twin", "open_session",
    "open_unverified", "provider_options", "read_metadata", "run_logits", "to_onnx",
    "update_metadata", "verify", "weights_sha256",
]
