"""The lipcert BentoML service: predictions with certified L2 radii from 1-Lipschitz ONNX models.

Run from the repository root with ``bentoml serve`` (``bentofile.yaml`` names
``service.service:LipCert``). Endpoints (all POST, JSON out; OpenAPI at ``/docs.json``):

- ``/predict``: multipart ``image`` file (+ optional ``model``) → one :class:`Prediction`.
- ``/predict_tensor``: JSON ``images`` N×C×H×W in [0, 1] (+ optional ``model``) → one
  :class:`Prediction` per image; adaptively batched across concurrent requests.
- ``/certify``: ``image`` file or ``images`` tensor, ``eps``, optional ``models`` → is each
  prediction certified at ``eps`` (model-input units) by each model.
- ``/models``: every served model with its audit, accuracy, size, latency and memory; also the
  refused ones and why.

GET ``/`` is the web page (``service/web.py``, files in ``service/static/``); BentoML's own API
page moves to ``/docs``.

Configuration (environment): ``LIPCERT_MODELS`` (a folder of ONNX files instead of the model
store), ``LIPCERT_MAX_UPLOAD_BYTES`` (8 MiB), ``LIPCERT_MAX_PIXELS`` (2²²),
``LIPCERT_MAX_REQUEST_BYTES`` (32 MiB), ``LIPCERT_INFLIGHT_BYTES`` (64 MiB of large bodies in
flight per worker) and ``LIPCERT_BODY_TIMEOUT_S`` (30 s to send a body; see
``service.middleware``), ``LIPCERT_BOUND_TOLERANCE`` (0.01), ``LIPCERT_PROVIDERS``,
``LIPCERT_ORT_THREADS``, ``LIPCERT_PROFILE_RUNS`` (see ``service.loader``); ``LIPCERT_WORKERS``,
``LIPCERT_API_THREADS``, ``LIPCERT_MAX_BATCH``, ``LIPCERT_MAX_LATENCY_MS`` (below).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, ServiceUnavailable
from pydantic import Field

from service.bento_models import bento_sources, model_references
from service.bentoml_patches import prepare_serving_worker
from service.errors import InvalidArgument, NotFound, UnprocessableEntity
from service.images import ImageLimits, decode_image, to_model_input
from service.loader import (
    LoadOptions,
    ModelRefused,
    Refusal,
    ServedModel,
    discover,
    load_all,
)
from service.metrics import get_metrics
from service.middleware import (
    BodyBudgetMiddleware,
    ErrorShapeMiddleware,
    FormGuardMiddleware,
    OpenAPIErrorsMiddleware,
    RequestSizeLimitMiddleware,
)
from service.responses import PredictionList
from service.schemas import (
    Certification,
    CertifyResponse,
    LatencyStats,
    ModelInfo,
    ModelsResponse,
    Prediction,
    Refused,
    TensorItem,
    TensorRequest,
    tensor_array,
)
from service.tensors import tensor_batch
from service.web import create_web_app

logger = logging.getLogger(__name__)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _env_workers(default: int | str) -> int | str:
    """``LIPCERT_WORKERS``: a number of worker processes, or ``cpu_count``."""
    value = os.environ.get("LIPCERT_WORKERS", "").strip()
    if not value:
        return default
    if value == "cpu_count":
        return value
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"LIPCERT_WORKERS={value!r}: give a number >= 1 or 'cpu_count'")
    return int(value)


#: Adaptive batching of /predict_tensor (also the most images one request may hold): images per
#: batch, and the latency bound (ms) the dispatcher plans against. 64 images of the small CPU
#: models run in a few ms; the generous bound keeps the dispatcher from shedding load (it
#: answers 503 when it predicts a miss). ``LIPCERT_MAX_BATCH``, ``LIPCERT_MAX_LATENCY_MS``.
MAX_BATCH_SIZE = _env_int("LIPCERT_MAX_BATCH", 64)
MAX_LATENCY_MS = _env_int("LIPCERT_MAX_LATENCY_MS", 1000)
#: Worker processes (``LIPCERT_WORKERS``, default one per core, as met issue 17's targets on two
#: cores; BentoML's ``services.lipcert.workers`` wins): each has its own event loop, batcher and
#: sessions and loads (re-audits) every model, so memory grows with workers × models. With more
#: than one, each session gets one ONNX Runtime thread unless ``LIPCERT_ORT_THREADS`` says.
WORKERS = _env_workers("cpu_count")
#: Threads per worker for the synchronous APIs and the batch runs (``LIPCERT_API_THREADS``):
#: ONNX Runtime releases the GIL, so a run overlaps the event loop's HTTP work.
API_THREADS = _env_int("LIPCERT_API_THREADS", 4)

# ``/certify``'s default for ``image`` (a pydantic field, so no list is shared between calls)
_NO_FILES = Field(default_factory=list)


class _Outcome:
    """Labels of the request being served, filled in once its model is known."""

    def __init__(self) -> None:
        self.method = "none"
        self.model = "none"

    def set(self, model: ServedModel) -> None:
        self.method, self.model = model.method, model.name


#: The models ``bentoml build`` packages with the service (service/bento_models.py): class
#: attributes of a base class, so the selection is made from the store when this module loads.
_BentoModelReferences = type("_BentoModelReferences", (), model_references())


@bentoml.service(name="lipcert", traffic={"timeout": 60}, workers=WORKERS, threads=API_THREADS)
class LipCert(_BentoModelReferences):
    """Serves every verified lipcert model (see the module docstring)."""

    def __init__(self) -> None:
        self.limits = ImageLimits(
            max_bytes=_env_int("LIPCERT_MAX_UPLOAD_BYTES", ImageLimits.max_bytes),
            max_pixels=_env_int("LIPCERT_MAX_PIXELS", ImageLimits.max_pixels),
        )
        options = LoadOptions.from_env(profile_batch=MAX_BATCH_SIZE)
        if WORKERS != 1 and "LIPCERT_ORT_THREADS" not in os.environ:
            # workers share the cores: one thread each, none spinning beside the others' loops
            options = dataclasses.replace(options, intra_op_threads=1)
        try:
            bento = getattr(LipCert, "bento", None)  # set when serving a built bento
            sources = bento_sources(bento) if bento is not None else discover()
        except ModelRefused as exc:
            logger.error("lipcert: %s", exc)
            sources = []
        self.served, refused = load_all(sources, options)
        self.refused: list[Refusal] = refused
        self.by_name = {m.name: m for m in self.served}
        self.default = max(self.served, key=_rank, default=None)
        if self.default is None:
            logger.error("lipcert: no servable model (%d refused); /readyz stays 503",
                         len(refused))
        self.metrics = get_metrics()
        for model in self.served:
            self.metrics.memory.labels(model.method, model.name).set(model.memory_bytes)

    @bentoml.on_startup
    def prepare_worker(self) -> None:
        """Keep pauses off the serving worker's event loop: :func:`prepare_serving_worker`."""
        prepare_serving_worker(bentoml.server_context.worker_index)

    def __is_ready__(self) -> bool:
        """Ready only with at least one servable model."""
        return bool(self.served)

    # ------------------------------------------------------------------ helpers

    def resolve(self, name: str | None) -> ServedModel:
        """The model called ``name`` (or the best one of that method); the default for None.

        Raises:
            ServiceUnavailable: no model is served (503).
            NotFound: no model of that name or method (404).
        """
        if not self.served:
            raise ServiceUnavailable("no model is being served; see the server log")
        if name is None or name == "":
            return self.default
        if name in self.by_name:
            return self.by_name[name]
        same_method = [m for m in self.served if m.method == name.lower()]
        if same_method:
            return max(same_method, key=_rank)
        raise NotFound(f"unknown model {name!r}; choose from {', '.join(sorted(self.by_name))}")

    @contextlib.contextmanager
    def _counted(self, endpoint: str) -> Iterator[_Outcome]:
        """Count the request under ``outcome`` ok / rejected (4xx) / error (anything else)."""
        labels = _Outcome()
        outcome = "error"
        try:
            yield labels
            outcome = "ok"
        except BentoMLException as exc:
            outcome = "rejected" if 400 <= int(exc.error_code) < 500 else "error"
            raise
        finally:
            self.metrics.requests.labels(labels.method, labels.model, endpoint, outcome).inc()

    def _infer(self, model: ServedModel, batch: np.ndarray, endpoint: str
               ) -> tuple[np.ndarray, np.ndarray, float]:
        """Logits, radii and milliseconds of one session run; metrics observed."""
        start = time.perf_counter()
        logits = model.run(batch)
        seconds = time.perf_counter() - start
        radii = model.radii(logits)
        self.metrics.latency.labels(model.method, model.name, endpoint).observe(seconds)
        hist = self.metrics.radius.labels(model.method, model.name)
        for r in radii:
            hist.observe(float(r))
        return logits, radii, seconds * 1e3

    def _read_upload(self, image: Path) -> Any:
        size = image.stat().st_size
        if size > self.limits.max_bytes:
            from service.errors import PayloadTooLarge

            raise PayloadTooLarge(
                f"the image upload has {size} bytes; the limit is {self.limits.max_bytes}")
        return decode_image(image.read_bytes(), self.limits)

    def tensor_items(self, images: Any, model: str | None) -> list[TensorItem]:
        """Validate a ``/predict_tensor`` batch and split it into batching items.

        Called before batching (by :class:`TensorRequest`'s validator for JSON, by its
        ``from_http_request`` for binary bodies), so errors are per request.

        Args:
            images: nested lists (JSON), a decoded ``.npy`` array, or a raw body
                (``service.tensors.RawBody``).
            model: a model or method name; None for the default.

        Raises:
            The typed 4xx errors of :func:`service.tensors.tensor_batch` and :meth:`resolve`.
        """
        labels = _Outcome()
        try:
            served = self.resolve(model)
            labels.set(served)
            batch = tensor_batch(images, served.input_shape, MAX_BATCH_SIZE)
        except BentoMLException:
            # accepted requests are counted after inference, rejected ones here
            self.metrics.requests.labels(labels.method, labels.model, "predict_tensor",
                                         "rejected").inc()
            raise
        # each item is a view of the request's batch, which rides along: a batch that is one
        # whole request runs without a copy (see _gather)
        return [TensorItem.model_construct(model=served.name, image=x, first=(i == 0),
                                           batch=batch, index=i)
                for i, x in enumerate(batch)]

    # ------------------------------------------------------------------ API

    @bentoml.api(route="/predict")
    def predict(self, image: Path, model: str | None = None) -> Prediction:
        """Classify one uploaded image (png, jpeg, bmp, gif, tiff, webp, ppm) and certify it.

        The upload is mapped to the model's input (channel averaging or copying, area
        downsampling by an integer factor, else bilinear resizing); ``certified_radius`` is in
        the model input's [0, 1] pixels and ``certified_radius_uploaded`` in the upload's.
        """
        with self._counted("predict") as labels:
            served = self.resolve(model)
            labels.set(served)
            pre = to_model_input(self._read_upload(image), served.input_shape)
            logits, radii, ms = self._infer(served, pre.array[None], "predict")
            return _predictions(served, logits, radii, pre.norm, ms, list(pre.steps))[0]

    @bentoml.api(
        route="/predict_tensor",
        input_spec=TensorRequest,
        output_spec=PredictionList,
        batchable=True,
        max_batch_size=MAX_BATCH_SIZE,
        max_latency_ms=MAX_LATENCY_MS,
    )
    def predict_tensor(self, images: list[TensorItem]) -> list[Prediction]:
        """Classify and certify N×C×H×W images in [0, 1] (adaptively batched, ≤ 64 per request).

        Concurrent requests are merged into batches of up to 64 images and one session run per
        model; ``inference_ms`` is that shared run's time.
        """
        out: list[Prediction | None] = [None] * len(images)
        by_model: dict[str, list[int]] = {}
        for i, item in enumerate(images):
            by_model.setdefault(item.model, []).append(i)
        for name, idx in by_model.items():
            served = self.by_name[name]
            try:
                logits, radii, ms = self._infer(served, _gather(images, idx), "predict_tensor")
            except Exception:
                self._count_items(images, idx, served, "error")
                raise
            for i, p in zip(idx, _predictions(served, logits, radii, 1.0, ms, []), strict=True):
                out[i] = p
            self._count_items(images, idx, served, "ok")
        return out  # type: ignore[return-value]

    def _count_items(self, items: list[TensorItem], idx: list[int], served: ServedModel,
                     outcome: str) -> None:
        # one count per request: each request's first image carries the flag
        n = sum(1 for i in idx if items[i].first)
        self.metrics.requests.labels(served.method, served.name, "predict_tensor",
                                     outcome).inc(n)

    @bentoml.api(route="/certify")
    def certify(
        self,
        eps: float,
        # a list, not Optional[Path]: BentoML 1.4.39 cannot build a file field from a union
        image: list[Path] = _NO_FILES,
        images: list[Any] | None = None,
        models: list[str] | str | None = None,
    ) -> CertifyResponse:
        """Is each prediction certified at L2 radius ``eps`` (model-input [0, 1] pixels)?

        Give either ``image`` (one or more uploaded files) or ``images`` (N×C×H×W in [0, 1]);
        ``models`` is a list of model names or methods (default: every served model).
        """
        with self._counted("certify") as labels:
            if not np.isfinite(eps) or eps < 0:
                raise UnprocessableEntity(f"eps must be a finite number >= 0, got {eps}")
            if bool(image) == (images is not None):
                raise InvalidArgument(
                    "give exactly one of 'image' (one or more files) or 'images' (a tensor)")
            if isinstance(models, str):
                models = [m.strip() for m in models.split(",") if m.strip()]
            chosen = [self.resolve(m) for m in models] if models else list(self.served)
            if not chosen:
                raise ServiceUnavailable("no model is being served; see the server log")
            if len(chosen) == 1:
                labels.set(chosen[0])
            if len(image) > MAX_BATCH_SIZE:
                raise UnprocessableEntity(f"at most {MAX_BATCH_SIZE} images per request")
            decoded = [self._read_upload(path) for path in image]
            results: list[Certification] = []
            for served in chosen:
                if decoded:
                    pres = [to_model_input(d, served.input_shape) for d in decoded]
                    batch = np.stack([p.array for p in pres])
                    norms = [p.norm for p in pres]
                else:
                    batch = tensor_array(images, served.input_shape, MAX_BATCH_SIZE)
                    norms = [1.0] * len(batch)
                logits, radii, _ = self._infer(served, batch, "certify")
                for i, (z, r, norm) in enumerate(zip(logits, radii, norms, strict=True)):
                    label = int(np.argmax(z))
                    results.append(Certification(
                        model=served.name, method=served.method, index=i, label=label,
                        class_name=served.classes[label], certified_radius=float(r),
                        certified_radius_uploaded=None if norm is None else float(r) / norm,
                        certified=bool(r > eps),
                    ))
            return CertifyResponse(eps=eps, results=results)

    @bentoml.api(route="/models")
    def models(self) -> ModelsResponse:
        """Every served model (method, size, data, accuracy, audited bound, latency, memory)."""
        import psutil

        with self._counted("models"):
            return ModelsResponse(
                models=[_model_info(m, m is self.default) for m in self.served],
                default_model=None if self.default is None else self.default.name,
                refused=[Refused(source=r.source, reason=r.reason) for r in self.refused],
                process_rss_bytes=int(psutil.Process().memory_info().rss),
            )


# Outermost first. Bodies are checked before BentoML parses them (see service.middleware): each
# API route with the names of its file fields.
_API_FILE_FIELDS = {api.route: tuple(getattr(api.input_spec, "multipart_fields", ()))
                    for api in LipCert.apis.values()}
LipCert.add_asgi_middleware(ErrorShapeMiddleware)
LipCert.add_asgi_middleware(RequestSizeLimitMiddleware)
LipCert.add_asgi_middleware(BodyBudgetMiddleware, routes=tuple(_API_FILE_FIELDS))
# the routes that also read binary tensor bodies (application/x-npy, application/octet-stream)
_BINARY_ROUTES = ("/predict_tensor",)
LipCert.add_asgi_middleware(FormGuardMiddleware, file_fields=_API_FILE_FIELDS,
                            binary_routes=_BINARY_ROUTES)
LipCert.add_asgi_middleware(OpenAPIErrorsMiddleware, routes=tuple(_API_FILE_FIELDS),
                            binary_routes=_BINARY_ROUTES)
# The web page at / (BentoML's own API page moves to /docs); see service/web.py.
LipCert.mount_asgi_app(create_web_app(), path="/", name="web")


def _rank(model: ServedModel) -> tuple[float, float, str]:
    """Default-model order: certified accuracy at 36/255, then clean accuracy."""
    cra = model.cra()
    return (-1.0 if cra is None else cra,
            -1.0 if model.clean_accuracy is None else model.clean_accuracy, model.name)


def _gather(items: list[TensorItem], idx: list[int]) -> np.ndarray:
    """The ``(N, C, H, W)`` batch of ``items[idx]``: a whole request's own array when the items
    are exactly that request, in order (no copy: a binary body is run as it arrived), else a
    stacked copy."""
    whole = items[idx[0]].batch
    if (whole is not None and len(whole) == len(idx)
            and all(items[i].batch is whole and items[i].index == k for k, i in enumerate(idx))):
        return whole
    return np.stack([items[i].image for i in idx])


def _predictions(served: ServedModel, logits: np.ndarray, radii: np.ndarray,
                 norm: float | None, ms: float, steps: list[str]) -> list[Prediction]:
    """One :class:`Prediction` per row of ``logits`` (N, classes) and its radius.

    Vectorized: label, margin and the Python floats are computed for the whole batch at once
    (the same float32 arithmetic as per row); the radii are the ones given, unchanged. The
    values are built here, so the models are constructed without re-validation.
    """
    rows = np.arange(len(logits))
    labels = logits.argmax(axis=1)
    others = logits.copy()
    others[rows, labels] = -np.inf
    margins = (logits[rows, labels] - others.max(axis=1)).tolist()
    out = []
    for label, scores, margin, radius in zip(labels.tolist(), logits.tolist(), margins,
                                             radii.tolist(), strict=True):
        out.append(Prediction.model_construct(
            model=served.name, method=served.method, label=label,
            class_name=served.classes[label], scores=scores, margin=margin,
            certified_radius=radius,
            certified_radius_uploaded=None if norm is None else radius / norm,
            lipschitz_bound=served.lipschitz_bound, certificate=served.certificate,
            inference_ms=ms, preprocessing=steps,
        ))
    return out


def _model_info(m: ServedModel, default: bool) -> ModelInfo:
    return ModelInfo(
        name=m.name, tag=m.tag, method=m.method, size=m.size, dataset=m.dataset,
        classes=m.classes, input_shape=list(m.input_shape), parameters=m.parameters,
        clean_accuracy=m.clean_accuracy, certified_accuracy=m.certified_accuracy,
        lipschitz_bound=m.audited_bound, lipschitz_bound_body=m.body_bound,
        lipschitz_bound_head=m.head_bound, certificate=m.certificate, onnx_bytes=m.onnx_bytes,
        provider=m.provider, latency={k: LatencyStats(**v) for k, v in m.latency_ms.items()},
        session_memory_bytes=m.memory_bytes, default=default,
    )
