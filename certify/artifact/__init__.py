"""The certified artifact: one audited ONNX file per model — its format, export, and load.

**Format.** A single self-contained ONNX file (opset :data:`OPSET`, no external data); input
``image`` float32 ``(N, C, H, W)`` in [0, 1] with a dynamic batch axis; output ``logits``.
``metadata_props`` carry the keys of :data:`METADATA_KEYS` (strings; JSON for lists and dicts):
what the model is (method, size, dataset, classes, config), what the audit found when it was
exported (bounds, certificate, head distances), versions, and ``weights_sha256`` (sha256 over
every initializer sorted by name, then every ``Constant`` node's tensor sorted by output name;
each contributes ``name NUL data_type NUL dims NUL raw little-endian bytes``).

**Metadata is information, never trusted.** :func:`load` reads the file's bytes once and derives
the certificate from the graph those bytes hold (see :mod:`certify.artifact.structure`):

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

from certify.artifact.export import to_onnx, update_metadata
from certify.artifact.format import (
    CERTIFICATES,
    HEAD_CERTIFICATES,
    INPUT_NAME,
    LIPCERT_FORMAT,
    METADATA_KEYS,
    OPSET,
    OUTPUT_NAME,
    PARITY_ATOL,
    SIGNING_KEY_ENV,
    ExportError,
    ModelVerificationError,
    decode_metadata,
    decode_value,
    encode_value,
    read_metadata,
    weights_sha256,
)
from certify.artifact.load import (
    Artifact,
    certificate_kwargs,
    load,
    load_bytes,
    load_onnx,
    load_twin,
    open_unverified,
    verify,
)
from certify.artifact.runtime import (
    default_providers,
    open_session,
    provider_options,
    run_logits,
)
from certify.artifact.structure import export_proto

__all__ = [
    "CERTIFICATES", "HEAD_CERTIFICATES", "INPUT_NAME", "LIPCERT_FORMAT", "METADATA_KEYS",
    "OPSET", "OUTPUT_NAME", "PARITY_ATOL", "SIGNING_KEY_ENV", "Artifact", "ExportError",
    "ModelVerificationError", "certificate_kwargs", "decode_metadata", "decode_value",
    "default_providers", "encode_value", "export_proto", "load", "load_bytes", "load_onnx",
    "load_twin", "open_session", "open_unverified", "provider_options", "read_metadata",
    "run_logits", "to_onnx", "update_metadata", "verify", "weights_sha256",
]
