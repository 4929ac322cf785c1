"""Request and response models of the service (pydantic).

``TensorRequest`` is the input of the adaptively batched ``/predict_tensor``. A batchable BentoML
API takes exactly one batched argument, but the endpoint also takes an optional ``model``; the
request is therefore parsed, validated and split *before* batching into one :class:`TensorItem`
per image (each carrying its model), and BentoML's dispatcher concatenates the item lists of
concurrent requests. Validation raises typed BentoML errors (422, 404) from inside pydantic, which
lets them through unchanged, so a bad request is answered on its own and never fails a batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.errors import InvalidArgument, UnprocessableEntity

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


class TensorRequest(BaseModel):
    """``{"images": N×C×H×W, "model": optional}``, validated and split into items.

    The ``before`` validator needs the running service to resolve the model and its input
    shape: it asks ``bentoml.get_current_service()`` for ``tensor_items(images, model)``.
    """

    model_config = ConfigDict(json_schema_extra=_tensor_request_schema)

    images: list[TensorItem]

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
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
        import bentoml

        service = bentoml.get_current_service()
        return {"images": service.tensor_items(images, model)}


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
    if not isinstance(images, list) or not images:
        raise InvalidArgument("images must be a non-empty N×C×H×W list of numbers")
    try:
        arr = np.asarray(images)
    except ValueError:  # numpy >= 1.24 refuses ragged nested lists
        raise UnprocessableEntity(
            "images is ragged: every image must have the same C×H×W") from None
    # kinds: f float, i/u integer; strings (U), None or mixed objects (O), booleans (b) are not
    # pixel values (asarray with a float dtype would silently parse "0.5" or True)
    if arr.dtype.kind not in "fiu":
        raise InvalidArgument("images must contain only numbers")
    if arr.ndim != 4:
        raise UnprocessableEntity(
            f"images must be N×C×H×W (4 dimensions), got {arr.ndim}: shape {list(arr.shape)}")
    if tuple(arr.shape[1:]) != tuple(shape):
        raise UnprocessableEntity(
            f"each image must be C×H×W = {list(shape)}, got {list(arr.shape[1:])}")
    if arr.shape[0] > max_batch:
        raise UnprocessableEntity(f"at most {max_batch} images per request, got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        raise UnprocessableEntity("images contain NaN or Inf")
    low, high = float(arr.min()), float(arr.max())
    if low < 0.0 or high > 1.0:
        raise UnprocessableEntity(f"pixel values must be in [0, 1], got [{low:.6g}, {high:.6g}]")
    return arr.astype(np.float32)

