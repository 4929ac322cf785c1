"""Request and response models of the service (pydantic).

``TensorRequest`` is the input of the adaptively batched ``/predict_tensor``. A batchable BentoML
API takes exactly one batched argument, but the endpoint also takes an optional ``model``; the
request is therefore parsed, validated and split *before* batching into one :class:`TensorItem`
per image (each carrying its model), and BentoML's dispatcher concatenates the item lists of
concurrent requests. Validation raises typed BentoML errors (422, 404) from inside pydantic, which
lets them through unchanged, so a bad request is answered on its own and never fails a batch.

``TensorRequest`` also reads the binary forms of ``service.tensors`` (``.npy`` and raw bytes, the
model and dtype in the query string) through its own ``from_http_request``, BentoML's hook for
parsing a request; large bodies are parsed in a worker thread, off the event loop.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import bentoml
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from service.errors import InvalidArgument
from service.tensors import (
    BINARY_TYPES,
    NPY_TYPE,
    RAW_TYPE,
    RawBody,
    check_raw_length,
    json_batch,
    npy_array,
    parse_dtype,
)

if TYPE_CHECKING:
    from starlette.requests import Request

#: Bodies above these sizes are parsed in a worker thread: JSON (pydantic's parse, nested lists
#: to an array) costs ~1 µs per value, a binary body only its range check (~1 ns per value).
OFFLOAD_JSON_BYTES = 64 * 2**10
OFFLOAD_BINARY_BYTES = 2**20
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")

#: Marks an optional response field ``nullable`` in the OpenAPI document: BentoML flattens a
#: top-level ``anyOf: [T, null]`` to ``T``, which would make a ``null`` answer break the schema.
NULLABLE: dict[str, Any] = {"nullable": True}


class Prediction(BaseModel):
    """One image's prediction and certificate."""

    model: str = Field(description="name of the model that answered")
    method: str = Field(description="its 1-Lipschitz method (aol, sll, …)")
    label: int = Field(description="predicted class index (argmax of the logits)")
    class_name: str
    scores: list[float] = Field(description="the logits")
    margin: float = Field(description="top logit minus the runner-up")
    certified_radius: float = Field(
        description="L2 radius in the model input's [0,1] pixels within which the label cannot "
        "change (0: not certified)")
    certified_radius_uploaded: float | None = Field(
        json_schema_extra=NULLABLE,
        description="the same radius in the uploaded image's own [0,1] pixels, where the "
        "preprocessing is linear with a known norm; null otherwise")
    lipschitz_bound: float = Field(description="the audited bound the radius divides by")
    certificate: str = Field(
        description="generic, linear_head (LLN, linear heads) or pairwise (CRC-Lip) "
        "certificate")
    inference_ms: float = Field(description="ONNX Runtime time of the (batched) run")
    preprocessing: list[str] = Field(default_factory=list,
                                     description="steps that mapped the upload to the input")


class Certification(BaseModel):
    """Whether one image's prediction by one model is certified at ``eps``."""

    model: str
    method: str
    index: int = Field(description="the image's position in the request")
    label: int
    class_name: str
    certified_radius: float
    certified_radius_uploaded: float | None = Field(json_schema_extra=NULLABLE)
    certified: bool = Field(description="certified_radius > eps (strict)")


class CertifyResponse(BaseModel):
    """``/certify``: one entry per (model, image)."""

    eps: float
    results: list[Certification]


class LatencyStats(BaseModel):
    p50_ms: float
    p95_ms: float


class ModelInfo(BaseModel):
    """One served model, as ``/models`` lists it."""

    name: str
    tag: str | None = Field(json_schema_extra=NULLABLE)
    method: str
    size: str
    dataset: str
    classes: list[str]
    input_shape: list[int]
    parameters: int
    clean_accuracy: float | None = Field(json_schema_extra=NULLABLE)
    certified_accuracy: dict[str, float] = Field(description="CRA by ε (4-decimal keys)")
    lipschitz_bound: float = Field(description="audited upper bound of the whole network")
    lipschitz_bound_body: float | None = Field(json_schema_extra=NULLABLE)
    lipschitz_bound_head: float | None = Field(json_schema_extra=NULLABLE)
    certificate: str
    onnx_bytes: int
    provider: str
    latency: dict[str, LatencyStats] = Field(description="measured at load, per batch size")
    session_memory_bytes: int = Field(description="RSS added by loading the session")
    default: bool


class Refused(BaseModel):
    source: str
    reason: str


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    default_model: str | None = Field(json_schema_extra=NULLABLE)
    refused: list[Refused]
    process_rss_bytes: int


class TensorItem(BaseModel):
    """One validated image of a ``/predict_tensor`` request (internal: the batching unit)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str
    image: Any = Field(description="(C, H, W) float32 array in [0, 1]")
    first: bool = Field(description="the first image of its request (counts the request once)")
    batch: Any = Field(default=None, description="the request's whole (N, C, H, W) batch")
    index: int = Field(default=0, description="this image's position in ``batch``")


def _tensor_request_schema(schema: dict[str, Any]) -> None:
    """The schema clients see: ``images`` N×C×H×W numbers and an optional ``model``."""
    schema["properties"] = {
        "images": {
            "title": "Images",
            "description": "N×C×H×W nested lists of numbers in [0, 1] (N ≤ the batch limit)",
            "type": "array",
            "items": {"type": "array", "items": {"type": "array", "items": {
                "type": "array", "items": {"type": "number"}}}},
        },
        "model": {"title": "Model", "type": "string",
                  "description": "model name or method; default: best certified accuracy"},
    }
    schema["required"] = ["images"]


class TensorRequest(bentoml.IODescriptor):
    """``{"images": N×C×H×W, "model": optional}``, validated and split into items.

    The ``before`` validator needs the running service to resolve the model and its input
    shape: it asks ``bentoml.get_current_service()`` for ``tensor_items(images, model)``.
    Binary bodies (``application/x-npy``, ``application/octet-stream``) take the same path from
    :meth:`from_http_request`, with ``model`` (and the raw body's ``dtype``) in the query; a JSON
    body may name its model in the query too.
    """

    model_config = ConfigDict(json_schema_extra=_tensor_request_schema)

    images: list[TensorItem]

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            raise InvalidArgument("the request body must be a JSON object with an 'images' field")
        images = data.get("images")
        if isinstance(images, list) and images and isinstance(images[0], TensorItem):
            return data  # already split (e.g. a Python caller passing items)
        if images is None:
            raise InvalidArgument("the request has no 'images' field")
        unknown = set(data) - {"images", "model"}
        if unknown:
            raise InvalidArgument(f"unknown fields {sorted(unknown)}; allowed: images, model")
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            raise InvalidArgument(f"model must be a string, got {type(model).__name__}")
        query = (info.context or {}).get("model")  # ?model= of the request
        if query is not None and model is not None and query != model:
            raise InvalidArgument(f"the body names model {model!r} and the query {query!r}; "
                                  "give one")
        model = model if model is not None else query
        return {"images": bentoml.get_current_service().tensor_items(images, model)}

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> TensorRequest:
        """Parse a JSON or binary body (BentoML's hook); large ones in a worker thread."""
        import anyio

        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media in _FORM_TYPES:  # a form's fields: BentoML's own parser, as before
            return await super().from_http_request(request, serde)  # type: ignore[return-value]
        body = await request.body()
        binary = media in BINARY_TYPES
        query = _query(request, {"model", "dtype"} if media == RAW_TYPE else {"model"})
        work = (functools.partial(_binary_request, cls, body, media, query) if binary
                else functools.partial(cls.model_validate_json, body or b"{}", context=query))
        limit = OFFLOAD_BINARY_BYTES if binary else OFFLOAD_JSON_BYTES
        if len(body) > limit:
            return await anyio.to_thread.run_sync(work)
        return work()


def _query(request: Request, allowed: set[str]) -> dict[str, str]:
    """The query parameters, each at most once and each one ``allowed`` for the content type."""
    params = request.query_params
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise InvalidArgument(f"unknown query parameters {unknown}; allowed with this content "
                              f"type: {', '.join(sorted(allowed))}")
    repeated = sorted(k for k in params if len(params.getlist(k)) > 1)
    if repeated:
        raise InvalidArgument(f"query parameters {repeated} are given more than once")
    return dict(params)


def _binary_request(cls: type[TensorRequest], body: bytes, media: str,
                    query: dict[str, str]) -> TensorRequest:
    """A binary body's items: the ``.npy`` parsed (or the raw length checked) before the model
    is resolved, so a malformed body is a 400 whatever is served."""
    if media == NPY_TYPE:
        images: Any = npy_array(body)
    else:
        dtype = parse_dtype(query.get("dtype"))
        check_raw_length(body, dtype)
        images = RawBody(body, dtype)
    items = bentoml.get_current_service().tensor_items(images, query.get("model") or None)
    return cls.model_construct(images=items)


def tensor_array(images: Any, shape: tuple[int, int, int], max_batch: int) -> np.ndarray:
    """Validate nested lists as an ``(N, C, H, W)`` float32 batch in [0, 1].

    Args:
        images: the JSON value of ``images``.
        shape: the model's ``(C, H, W)``.
        max_batch: the largest accepted N.

    Returns:
        The batch.

    Raises:
        InvalidArgument: not a list of numbers (400).
        UnprocessableEntity: ragged, wrong rank or shape, too many images, NaN/Inf, or values
            outside [0, 1] (422).
    """
    return json_batch(images, shape, max_batch)
