"""Image tensors in request bodies: nested JSON lists, ``.npy`` files and raw bytes.

``/predict_tensor`` takes a batch ``N×C×H×W`` of pixel values in three forms:

- JSON ``{"images": N×C×H×W lists of numbers in [0, 1], "model": …}`` (``application/json``);
- a NumPy ``.npy`` file (``application/x-npy``, what ``np.save`` writes): float32 values in
  [0, 1] or uint8 values in 0..255 (divided by 255), shape ``N×C×H×W`` in the header;
- raw bytes (``application/octet-stream``): the values of a C-ordered ``N×C×H×W`` array, float32
  little-endian (default) or uint8 (``?dtype=uint8``); N is the byte count over the model's
  ``C×H×W`` values.

The binary forms cost no parsing: the float32 array is a read-only view of the request body
(``np.frombuffer``, no copy), and ONNX Runtime reads it as it is. Every form ends in
:func:`check_batch`, so the same values are refused in each, with the same message. A ``.npy``
header is parsed by NumPy's own reader (``ast.literal_eval`` of a header of at most 10 000
bytes); the data is never unpickled: only the two plain dtypes above are accepted.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import InvalidArgument, UnprocessableEntity, one_line

#: Content types of the binary forms, and their names in error messages.
NPY_TYPE = "application/x-npy"
RAW_TYPE = "application/octet-stream"
BINARY_TYPES = (NPY_TYPE, RAW_TYPE)

#: dtypes a binary body may carry (little-endian float32, uint8), by their names for ``?dtype=``.
DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "uint8": np.dtype("u1")}
_NPY_VERSIONS = ((1, 0), (2, 0))


def check_shape(arr: np.ndarray, shape: tuple[int, int, int], max_batch: int) -> None:
    """Rank, per-image shape and image count of a batch.

    Raises:
        UnprocessableEntity: wrong rank or shape, no image or more than ``max_batch`` (422).
    """
    if arr.ndim != 4:
        raise UnprocessableEntity(
            f"images must be N×C×H×W (4 dimensions), got {arr.ndim}: shape {list(arr.shape)}")
    if tuple(arr.shape[1:]) != tuple(shape):
        raise UnprocessableEntity(
            f"each image must be C×H×W = {list(shape)}, got {list(arr.shape[1:])}")
    if arr.shape[0] < 1:
        raise UnprocessableEntity("images holds no image (N = 0)")
    if arr.shape[0] > max_batch:
        raise UnprocessableEntity(f"at most {max_batch} images per request, got {arr.shape[0]}")


def check_values(arr: np.ndarray) -> np.ndarray:
    """Pixel values finite and in [0, 1]; returns them as float32 (no copy when they are).

    Raises:
        UnprocessableEntity: NaN/Inf, or values outside [0, 1] (422).
    """
    low, high = arr.min(), arr.max()  # a NaN propagates through both
    if not (np.isfinite(low) and np.isfinite(high)):
        raise UnprocessableEntity("images contain NaN or Inf")
    if low < 0 or high > 1:
        raise UnprocessableEntity(
            f"pixel values must be in [0, 1], got [{float(low):.6g}, {float(high):.6g}]")
    return arr.astype(np.float32, copy=False)


def check_batch(arr: np.ndarray, shape: tuple[int, int, int], max_batch: int) -> np.ndarray:
    """:func:`check_shape` then :func:`check_values`: the batch as float32 in [0, 1].

    Args:
        arr: a numeric array of pixel values in [0, 1].
        shape: the model's ``(C, H, W)``.
        max_batch: the largest accepted N.

    Raises:
        UnprocessableEntity: see :func:`check_shape` and :func:`check_values` (422).
    """
    check_shape(arr, shape, max_batch)
    return check_values(arr)


def to_unit(arr: np.ndarray) -> np.ndarray:
    """Pixel values in [0, 1]: uint8 divided by 255 (as the image uploads are), float as is."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    return arr


def parse_dtype(name: str | None) -> np.dtype:
    """The dtype named by ``?dtype=`` (default float32).

    Raises:
        InvalidArgument: another name (400).
    """
    if name is None or name == "":
        return DTYPES["float32"]
    if name not in DTYPES:
        raise InvalidArgument(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def raw_array(body: bytes, dtype: np.dtype, shape: tuple[int, int, int]) -> np.ndarray:
    """The ``(N, C, H, W)`` view of raw C-ordered pixel bytes (no copy).

    Raises:
        InvalidArgument: an empty body (400).
        UnprocessableEntity: a byte count that is not a whole number of images (422).
    """
    if not body:
        raise InvalidArgument(f"the {RAW_TYPE} body is empty; send N×C×H×W {dtype.name} values")
    per_image = int(np.prod(shape)) * dtype.itemsize
    if len(body) % per_image:
        raise UnprocessableEntity(
            f"the body has {len(body)} bytes, not a whole number of {dtype.name} images of "
            f"C×H×W = {list(shape)} ({per_image} bytes each)")
    return np.frombuffer(body, dtype=dtype).reshape(-1, *shape)


def check_raw_length(body: bytes, dtype: np.dtype) -> None:
    """Refuse, before the model is known, a raw body that cannot hold whole values.

    Raises:
        InvalidArgument: an empty body (400).
        UnprocessableEntity: a byte count not a multiple of the value size (422).
    """
    if not body:
        raise InvalidArgument(f"the {RAW_TYPE} body is empty; send N×C×H×W {dtype.name} values")
    if len(body) % dtype.itemsize:
        raise UnprocessableEntity(f"the body has {len(body)} bytes, not a whole number of "
                                  f"{dtype.name} values ({dtype.itemsize} bytes each)")


def npy_array(body: bytes) -> np.ndarray:
    """The array of a ``.npy`` file (a view of ``body`` when C-ordered; never unpickled).

    Raises:
        InvalidArgument: not a ``.npy`` file, a malformed header, or data of the wrong length
            (400).
        UnprocessableEntity: a dtype other than float32 or uint8 (422).
    """
    from numpy.lib import format as npy

    stream = io.BytesIO(body)
    try:
        version = npy.read_magic(stream)
        if version not in _NPY_VERSIONS:
            raise ValueError(f"format version {version[0]}.{version[1]} (1.0 and 2.0 are read)")
        read_header = (npy.read_array_header_1_0 if version == (1, 0)
                       else npy.read_array_header_2_0)
        shape, fortran_order, dtype = read_header(stream)
    except (ValueError, SyntaxError, TypeError, EOFError, OverflowError) as exc:
        raise InvalidArgument(f"the body is not a valid .npy file: {one_line(exc)}") from None
    allowed = [d for d in DTYPES.values() if d == dtype]
    if not allowed:
        raise UnprocessableEntity(
            f"the .npy array has dtype {dtype.str!r}; send float32 (little-endian, '<f4') "
            "or uint8 ('|u1')")
    offset = stream.tell()
    count = int(np.prod(shape, dtype=np.int64))
    if len(body) - offset != count * dtype.itemsize:
        raise InvalidArgument(
            f"the .npy data has {len(body) - offset} bytes; its header declares shape "
            f"{list(shape)} of {dtype.name}, {count * dtype.itemsize} bytes")
    flat = np.frombuffer(body, dtype=allowed[0], count=count, offset=offset)
    if fortran_order:  # np.save of a Fortran-ordered array: one copy into C order
        return np.ascontiguousarray(flat.reshape(shape[::-1]).T)
    return flat.reshape(shape)


@dataclass(frozen=True)
class RawBody:
    """A raw ``application/octet-stream`` body and its dtype: decoded once the model (and so
    the image shape) is known."""

    data: bytes
    dtype: np.dtype


def tensor_batch(images: Any, shape: tuple[int, int, int], max_batch: int) -> np.ndarray:
    """A checked ``(N, C, H, W)`` float32 batch in [0, 1] from any request form.

    Args:
        images: nested lists (JSON), an array (a decoded ``.npy``), or a :class:`RawBody`.
        shape: the model's ``(C, H, W)``.
        max_batch: the largest accepted N.

    Raises:
        InvalidArgument: JSON that is not a list of numbers (400).
        UnprocessableEntity: a raw body of the wrong length, ragged lists, or
            :func:`check_batch`'s reasons (422).
    """
    if isinstance(images, RawBody):
        arr = raw_array(images.data, images.dtype, shape)
    elif isinstance(images, np.ndarray):
        arr = images
    else:
        return json_batch(images, shape, max_batch)
    check_shape(arr, shape, max_batch)  # before a uint8 batch is scaled (a copy)
    return check_values(to_unit(arr))


def json_batch(images: Any, shape: tuple[int, int, int], max_batch: int) -> np.ndarray:
    """Validate nested lists (the JSON ``images``) as an ``(N, C, H, W)`` float32 batch.

    Raises:
        InvalidArgument: not a list of numbers (400).
        UnprocessableEntity: ragged, or :func:`check_batch`'s reasons (422).
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
    return check_batch(arr, shape, max_batch)
