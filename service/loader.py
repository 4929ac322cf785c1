"""Finding, verifying and loading the served models: one ONNX Runtime session each.

Sources, in order of precedence:

- ``LIPCERT_MODELS=<folder>``: every ``*.onnx`` in the folder and every ``*/model.onnx`` one level
  down (the model store's layout); the BentoML model store is then not consulted.
- otherwise the BentoML model store: every model labelled ``lipcert=1``, its ``model.onnx``.

A model is served only if all of these hold, else it is *refused* and the log says why:
:func:`certify.artifact.load` proves it (the file's bytes are read once; the graph must be
exactly the export of the network its config describes, with the file's weights; the bound, head
distances and certificate are re-audited from that graph, never read from metadata, and the
metadata must agree with them; the session is built from the same bytes), and the bound the
certificate divides by is at most ``1 + tolerance``: the whole network's bound for the generic
certificate (a Standard, unconstrained network therefore is refused: DESIGN's rule, even though
dividing by a larger bound would still give sound radii), the body bound for the head
certificates (``linear_head``: LLN and linear heads; ``pairwise``: CRC-Lip), whose heads are not
1-Lipschitz by design and are certified through ``head_distances``.

At load each session is profiled: resident memory added by creating and warming it (RSS delta,
so approximate), and latency percentiles of a few runs at batch 1 and at the batching size.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: A served model's audited bound may exceed 1 by this much (floating-point audit slack).
DEFAULT_BOUND_TOLERANCE = 1e-2
#: The ε whose certified accuracy picks the default model (the paper's 36/255).
DEFAULT_EPS = 36 / 255


@dataclass(frozen=True)
class ModelSource:
    """Where one candidate model lives.

    Attributes:
        name: what clients pass as ``model``.
        path: the ONNX file.
        tag: the model store tag, if from the store.
        report: the training report (the store model's metadata, or a ``report.json`` beside a
            ``model.onnx``): clean and certified accuracy are measured after export, so they live
            here rather than in the ONNX metadata.
    """

    name: str
    path: Path
    tag: str | None = None
    report: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadOptions:
    """How models are loaded.

    Args:
        bound_tolerance: accept audited bounds up to ``1 + bound_tolerance``.
        providers: ONNX Runtime providers, in order; ``None`` picks CUDA where a GPU is present.
        intra_op_threads: ONNX Runtime threads per session (0: its default).
        profile_runs: timed runs per batch size at load (0 skips the latency profile).
        profile_batch: the second profiled batch size (the service's batching size).
    """

    bound_tolerance: float = DEFAULT_BOUND_TOLERANCE
    providers: Sequence[str] | None = None
    intra_op_threads: int = 0
    profile_runs: int = 20
    profile_batch: int = 64

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: Any) -> LoadOptions:
        """Options from ``LIPCERT_BOUND_TOLERANCE``, ``LIPCERT_PROVIDERS`` (comma list),
        ``LIPCERT_ORT_THREADS`` and ``LIPCERT_PROFILE_RUNS``; ``overrides`` win."""
        kwargs: dict[str, Any] = {}
        if "LIPCERT_BOUND_TOLERANCE" in env:
            kwargs["bound_tolerance"] = float(env["LIPCERT_BOUND_TOLERANCE"])
        if env.get("LIPCERT_PROVIDERS"):
            kwargs["providers"] = tuple(p.strip() for p in env["LIPCERT_PROVIDERS"].split(","))
        if "LIPCERT_ORT_THREADS" in env:
            kwargs["intra_op_threads"] = int(env["LIPCERT_ORT_THREADS"])
        if "LIPCERT_PROFILE_RUNS" in env:
            kwargs["profile_runs"] = int(env["LIPCERT_PROFILE_RUNS"])
        kwargs.update(overrides)
        return cls(**kwargs)


class ModelRefused(ValueError):
    """A candidate model that must not be served; the message says why."""


@dataclass
class ServedModel:
    """One verified model and its ONNX Runtime session.

    ``lipschitz_bound`` is the bound the certificate divides by: the body bound with
    ``head_distances`` for the head certificates (linear_head, pairwise), the whole bound otherwise.
    """

    name: str
    path: Path
    tag: str | None
    method: str
    size: str
    dataset: str
    classes: list[str]
    input_shape: tuple[int, int, int]
    certificate: str
    lipschitz_bound: float
    audited_bound: float
    body_bound: float | None
    head_bound: float | None
    head_distances: np.ndarray | None
    clean_accuracy: float | None
    certified_accuracy: dict[str, float]
    parameters: int
    onnx_bytes: int
    metadata: dict[str, Any]
    session: Any = field(repr=False)
    input_name: str = "image"
    provider: str = "CPUExecutionProvider"
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    memory_bytes: int = 0
    slack_rel: float = 2.0**-12

    def run(self, images: np.ndarray) -> np.ndarray:
        """Logits ``(N, classes)`` float32 of ``images`` ``(N, C, H, W)`` float32 in [0, 1]."""
        return self.session.run(None, {self.input_name: images})[0]

    def radii(self, logits: np.ndarray) -> np.ndarray:
        """Certified radii ``(N,)`` of these logits, with this model's certificate."""
        from certify import certified_radius

        if self.head_distances is not None:
            return certified_radius(logits, self.lipschitz_bound,
                                    head_distances=self.head_distances, slack_rel=self.slack_rel)
        return certified_radius(logits, self.lipschitz_bound, slack_rel=self.slack_rel)

    def cra(self, eps: float = DEFAULT_EPS) -> float | None:
        """Certified accuracy at ``eps`` from the metadata, if recorded."""
        from certify.radius import eps_key

        return self.certified_accuracy.get(eps_key(eps))


@dataclass
class Refusal:
    """A model that is not served, and why."""

    source: str
    reason: str


# --------------------------------------------------------------------------- discovery


def discover(env: Mapping[str, str] = os.environ) -> list[ModelSource]:
    """The candidate models: the ``LIPCERT_MODELS`` folder if set, else the model store.

    Raises:
        ModelRefused: ``LIPCERT_MODELS`` names something that is not a folder.
    """
    folder = env.get("LIPCERT_MODELS")
    if folder:
        return discover_folder(Path(folder))
    return discover_store()


def discover_folder(folder: Path) -> list[ModelSource]:
    """``*.onnx`` in ``folder`` (named by the file stem) and ``*/model.onnx`` (by the folder)."""
    if not folder.is_dir():
        raise ModelRefused(f"LIPCERT_MODELS={str(folder)!r} is not a folder")
    found = [ModelSource(p.stem, p) for p in sorted(folder.glob("*.onnx"))]
    found += [ModelSource(p.parent.name, p, report=_read_report(p.parent / "report.json"))
              for p in sorted(folder.glob("*/model.onnx"))]
    return found


def _read_report(path: Path) -> dict[str, Any]:
    """A run's ``report.json`` if there is a readable one, else ``{}``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def discover_store() -> list[ModelSource]:
    """Every model labelled ``lipcert=1`` in the BentoML model store (named by its tag)."""
    from certify.artifact.store import list_models_here

    return [ModelSource(m.tag, m.path, tag=m.tag, report=m.metadata) for m in list_models_here()]


# --------------------------------------------------------------------------- metadata


def _float(meta: Mapping[str, Any], key: str) -> float | None:
    value = meta.get(key)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ModelRefused(f"metadata {key}={value!r} is not a number") from None


def _json(meta: Mapping[str, Any], key: str) -> Any:
    value = meta.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise ModelRefused(f"metadata {key} is not valid JSON") from None
    return value


def _check_bound(name: str, value: float | None, tolerance: float) -> float:
    if value is None:
        raise ModelRefused(f"the audited {name} is missing")
    if not math.isfinite(value) or value <= 0:
        raise ModelRefused(f"the audited {name} {value!r} is not a finite positive number")
    if value > 1 + tolerance:
        raise ModelRefused(
            f"the audited {name} {value:.6g} exceeds 1 + tolerance = {1 + tolerance:.6g}"
        )
    return value


def _certified_accuracy(meta: Mapping[str, Any]) -> dict[str, float]:
    data = _json(meta, "certified_accuracy")
    if not isinstance(data, Mapping):
        return {}
    return {str(k): float(v) for k, v in data.items()
            if k != "clean" and isinstance(v, (int, float)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------- loading


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _percentiles(times_s: list[float]) -> dict[str, float]:
    ms = np.asarray(times_s) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def profile_latency(model: ServedModel, batches: Sequence[int], runs: int) -> dict[str, dict]:
    """p50/p95 of ``runs`` timed session runs at each batch size (after two warm-up runs)."""
    rng = np.random.default_rng(0)
    out = {}
    for batch in batches:
        x = rng.random((batch, *model.input_shape), dtype=np.float32)
        for _ in range(2):
            model.run(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model.run(x)
            times.append(time.perf_counter() - t0)
        out[f"batch_{batch}"] = _percentiles(times)
    return out


def load_model(source: ModelSource, options: LoadOptions) -> ServedModel:
    """Load one model through :func:`certify.artifact.load` (the re-audit) and profile it.

    Args:
        source: where the model is.
        options: load options.

    Returns:
        The served model, profiled.

    Raises:
        ModelRefused: any failed check (see the module docstring).
    """
    from certify.artifact import HEAD_CERTIFICATES, ModelVerificationError, default_providers, load

    path = source.path
    providers = list(options.providers or default_providers())
    rss0 = _rss()
    try:
        # The bytes are read once; bound, head distances and certificate come from the graph.
        artifact = load(path, providers=providers, threads=options.intra_op_threads or None)
    except ModelVerificationError as exc:
        raise ModelRefused(f"verification failed: {exc}") from None
    meta = artifact.metadata
    result = artifact.audit
    certificate = result.certificate
    audited = float(result.bound)
    if certificate not in HEAD_CERTIFICATES:
        # Generic certificate: the whole network must be 1-Lipschitz. With a head certificate
        # (LLN, CRC-Lip) the head is not 1-Lipschitz by design; its body is checked below.
        audited = _check_bound("lipschitz_bound", audited, options.bound_tolerance)
    kwargs = artifact.certificate_kwargs()
    bound = _check_bound("certificate bound", float(kwargs["lipschitz_bound"]),
                         options.bound_tolerance)
    classes = [str(c) for c in meta["classes"]]
    shape = artifact.input_shape
    accuracy = {**meta, **dict(source.report)}  # the report's measured numbers win
    parameters = _float(accuracy, "parameters")
    served = ServedModel(
        name=source.name, path=path, tag=source.tag, method=str(meta["method"]),
        size=str(meta.get("size", "")), dataset=str(meta.get("dataset", "")),
        classes=classes, input_shape=shape, certificate=certificate,
        lipschitz_bound=bound, audited_bound=audited, body_bound=float(result.body_bound),
        head_bound=float(result.head_bound), head_distances=kwargs.get("head_distances"),
        clean_accuracy=_float(accuracy, "clean_accuracy"),
        certified_accuracy=_certified_accuracy(accuracy),
        parameters=int(parameters if parameters is not None else artifact.parameters),
        onnx_bytes=artifact.onnx_bytes, metadata=meta, session=artifact.session,
        input_name="image", provider=artifact.provider, slack_rel=kwargs["slack_rel"],
    )
    logits = served.run(np.zeros((1, *shape), dtype=np.float32))
    if logits.shape != (1, len(classes)):
        raise ModelRefused(f"ONNX output shape {logits.shape} does not match "
                           f"{len(classes)} classes")
    served.memory_bytes = max(0, _rss() - rss0)
    if options.profile_runs > 0:
        served.latency_ms = profile_latency(served, (1, options.profile_batch),
                                            options.profile_runs)
    return served


def load_all(sources: Sequence[ModelSource], options: LoadOptions
             ) -> tuple[list[ServedModel], list[Refusal]]:
    """Load every source; failures are logged and returned as refusals, never raised."""
    served, refused = [], []
    names: set[str] = set()
    for source in sources:
        try:
            if source.name in names:
                raise ModelRefused(f"another model is already served as {source.name!r}")
            model = load_model(source, options)
        except ModelRefused as exc:
            logger.error("lipcert: refusing model %s (%s): %s", source.name, source.path, exc)
            refused.append(Refusal(str(source.path), str(exc)))
            continue
        except Exception as exc:  # a malformed file must not take the whole service down
            logger.exception("lipcert: refusing model %s (%s)", source.name, source.path)
            refused.append(Refusal(str(source.path), f"unexpected error: {exc}"))
            continue
        names.add(model.name)
        logger.info("lipcert: serving %s (%s, %s, bound %.6g, %s)", model.name, model.method,
                    model.certificate, model.lipschitz_bound, model.provider)
        served.append(model)
    return served, refused
