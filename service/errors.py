"""The service's typed errors: BentoML exceptions, each a 4xx status with a one-line message.

BentoML renders a raised ``BentoMLException`` with its ``error_code``; the ones lipcert needs and
BentoML does not define are added here. Use :func:`one_line` on any text that came from a library
(PIL, onnxruntime) so that every error body stays one line.
"""

from __future__ import annotations

from http import HTTPStatus

from bentoml.exceptions import BentoMLException, InvalidArgument, NotFound, UnprocessableEntity

__all__ = [
    "InvalidArgument", "NotFound", "PayloadTooLarge", "UnprocessableEntity", "UnsupportedMediaType",
    "one_line",
]


class PayloadTooLarge(BentoMLException):
    """413: the upload has too many bytes, or the decoded image too many pixels."""

    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UnsupportedMediaType(BentoMLException):
    """415: the upload is not an image in one of the accepted formats."""

    error_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


def one_line(text: object, limit: int = 300) -> str:
    """``text`` with all whitespace runs collapsed to one space, cut at ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
