"""The answer of ``/predict_tensor``: a JSON list of predictions, serialized in one call.

BentoML 1.4.39 (pinned) wraps a ``list[...]`` return annotation in its ``IORootModel`` and, for
every response, builds the model's JSON schema to find the media type, dumps the predictions to
Python dicts once to see whether they are text, then again into ``json.dumps``. For a one-image
request on a small model that was ~10 % of a worker's time, more than the ONNX Runtime run
(py-spy, docs/service.md). :class:`PredictionList` is the same root model (same OpenAPI schema)
with a fixed media type and one pydantic-core serialization of the list.
"""

from __future__ import annotations

from typing import Any, ClassVar

from _bentoml_sdk.io_models import IORootModel
from pydantic import TypeAdapter
from starlette.responses import Response

from service.schemas import Prediction

_PREDICTIONS: TypeAdapter[list[Prediction]] = TypeAdapter(list[Prediction])


class PredictionList(IORootModel[list[Prediction]]):
    """``list[Prediction]`` as a response: ``application/json``, serialized by pydantic-core."""

    media_type: ClassVar[str | None] = "application/json"

    @classmethod
    async def to_http_response(cls, obj: Any, serde: Any) -> Response:
        """The JSON list of ``obj`` (the predictions, or this model holding them)."""
        items = obj.root if isinstance(obj, IORootModel) else obj
        return Response(_PREDICTIONS.dump_json(items), media_type="application/json")
