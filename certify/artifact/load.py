"""Load = re-audit: the certificate of a file, derived from the graph its bytes hold.

See :mod:`certify.artifact` for the steps and :mod:`certify.artifact.structure` for the proof
that the graph computes the audited twin.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from certify.artifact.format import (
    _REQUIRED,
    BOUND_RTOL,
    CERTIFICATES,
    HEAD_CERTIFICATES,
    LIPCERT_FORMAT,
    PARITY_ATOL,
    SIGNATURE_KEY,
    SIGNING_KEY_ENV,
    ModelVerificationError,
    _fail,
    _parse,
    _read_bytes,
    _signature,
    _signing_key,
    decode_metadata,
    weights_sha256,
)
from certify.artifact.runtime import _parity, open_session, run_logits
from certify.artifact.structure import (
    INPUT_NAME,
    OUTPUT_NAME,
    build_skeleton,
    legacy_configs,
    skeleton_proto,
    structure_mismatch,
)
from certify.audit import AuditResult, audit
from certify.radius import certified_radius, slack_for_provider
from models.graph_form import FORMS

logger = logging.getLogger(__name__)

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


def _first_form_mismatch(
    proto: Any, config: Mapping[str, Any], shape: tuple[int, ...], twin: nn.Module, clock: Any
) -> str | None:
    """None if ``proto``'s graph is the export of ``twin`` in some graph form, else the newest
    form's mismatch. Raises what :func:`skeleton_proto` raises."""
    first = None
    for form in FORMS:
        reference = skeleton_proto(config, shape, twin, form)
        clock.lap("export")
        mismatch = structure_mismatch(proto, reference, list(twin.state_dict()))
        clock.lap("compare")
        if mismatch is None:
            return None
        first = first or mismatch
    return first


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
        timings: seconds spent in each step of the load (``rebuild``, ``export``, ``compare``,
            ``audit``, ``session``, ``parity``), for ``python -m bench load``.
    """

    source: str
    metadata: dict[str, Any]
    audit: AuditResult
    twin: nn.Module = field(repr=False)
    session: Any = field(repr=False)
    onnx_bytes: int = 0
    parameters: int = 0
    timings: dict[str, float] = field(default_factory=dict)

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


class _Clock:
    """Seconds per step of a load (``laps``)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now


def _load_bytes(
    data: bytes,
    source: str,
    providers: Sequence[str] | None,
    threads: int | None,
    max_bound: float | None,
    signing_key: str | bytes | None,
) -> Artifact:
    clock = _Clock()
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
    first_mismatch = None
    # The stored config first; then what it meant under an earlier default, for older files.
    # Each in every graph form, newest first (older files were traced to an earlier form).
    for config in [meta["config"], *legacy_configs(meta["config"])]:
        try:
            twin = build_skeleton(config)
            clock.lap("rebuild")
            mismatch = _first_form_mismatch(proto, config, shape, twin, clock)
        except Exception as exc:  # any failure to rebuild is a refusal, never a crash
            raise _fail(
                source, f"cannot rebuild the stored config: {exc}".splitlines()[0]
            ) from None
        if mismatch is None:
            break
        first_mismatch = first_mismatch or mismatch
    else:
        raise _fail(source, f"graph is not the export of its config: {first_mismatch}")
    twin.load_state_dict(_twin_state(proto, twin), strict=True)
    twin.eval().requires_grad_(False)
    try:
        result = audit(twin, shape, lower=False)
        clock.lap("audit")
    except (TypeError, ValueError, RuntimeError) as exc:
        raise _fail(source, f"the audit refuses the graph: {exc}".splitlines()[0]) from None
    _cross_check(meta, result, source)
    if max_bound is not None and result.bound > max_bound:
        raise _fail(source, f"lipschitz_bound {result.bound} exceeds the allowed {max_bound}")
    try:
        session = open_session(data, providers, threads)
        clock.lap("session")
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise _fail(source, f"ONNX Runtime cannot load it: {exc}".splitlines()[0]) from None
    delta = _parity(session, twin, shape, seed=1)
    clock.lap("parity")
    if not delta <= PARITY_ATOL:
        raise _fail(source, f"ONNX Runtime differs from the audited twin by {delta:.3g}")
    meta.update(_audit_metadata(result))
    parameters = sum(int(np.prod(t.dims)) for t in graph.initializer)
    return Artifact(source, meta, result, twin, session, len(data), parameters, clock.laps)


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
    "Artifact", "certificate_kwargs", "load", "load_bytes", "load_onnx", "load_twin",
    "open_unverified", "verify",
]
