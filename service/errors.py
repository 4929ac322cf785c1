"""The service's typed errors: BentoML exceptions, each a 4xx status with a one-line message.

BentoML renders a raised ``BentoMLException`` with its ``error_code``; the ones lipcert needs and
BentoML does not define are added here. Use :func:`one_line` on any text that came from a library
(PIL, onnxruntime) so that every error body stays one line.
"""

from __future__ import annotations

from http import HTTPStatus

from bentoml.exceptions import BentoMLException, InvalidArgument, NotFound, UnprocessableEntity

__all__ = [
    "InvalidArgument", "NotFound", "PayloadTooLarge", "RequestTimeout", "TooManyRequests",
    "UnprocessableEntity", "UnsupportedMediaType", "one_line",
]


class PayloadTooLarge(BentoMLException):
    """413: the upload has too many bytes, or the decoded image too many pixels."""

    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UnsupportedMediaType(BentoMLException):
    """415: the upload is not an image in one of the accepted formats, or the request body's
    content type is not one the service reads."""

    error_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class RequestTimeout(BentoMLException):
    """408: the client did not send the whole request body in time."""

    error_code = HTTPStatus.REQUEST_TIMEOUT


class TooManyRequests(BentoMLException):
    """429: the worker's budget for request bodies in flight stayed full; retry later."""

    error_code = HTTPStatus.TOO_MANY_REQUESTS


def one_line(text: object, limit: int = 300) -> str:
    """``text`` with all whitespace runs collapsed to one space, cut at ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
