"""The artifact's file format: metadata schema, weights hash, signing, errors.

See :mod:`certify.artifact` for what the file is and how it is trusted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from certify.artifact.structure import INPUT_NAME, OPSET, OUTPUT_NAME

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


def _fail(source: str, message: str) -> ModelVerificationError:
    return ModelVerificationError(f"{source}: {message}")


__all__ = [
    "BOUND_RTOL", "CERTIFICATES", "HEAD_CERTIFICATES", "INPUT_NAME", "LIPCERT_FORMAT",
    "METADATA_KEYS", "OPSET", "OUTPUT_NAME", "PARITY_ATOL", "SIGNATURE_KEY", "SIGNING_KEY_ENV",
    "ExportError", "ModelVerificationError", "decode_metadata", "decode_value", "encode_value",
    "read_metadata", "weights_sha256",
]
