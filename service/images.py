"""Uploaded images: safe decoding, and the linear map to a model's input with its operator norm.

Decoding is defensive: only a fixed list of raster formats is tried (never PIL's EPS plugin,
which would call Ghostscript), the pixel count is checked from the header *before* the pixels
are decoded (decompression bombs), and truncated or corrupt data is an error, never silently
padded (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off).

Certified radius in the uploaded image's own pixel space. The model certifies ``x = P(u)``, the
preprocessed upload ``u``, at radius ``r`` (L2, [0, 1]-pixel units of the model input). When ``P``
is linear with operator norm ``‖P‖₂ ≤ p``, every ``δ`` with ``‖δ‖₂ < r / p`` moves ``x`` by less
than ``r``, so ``r / p`` is a sound radius in the upload's [0, 1] pixel space. The maps used, each
with its exact norm (we multiply the norms of the steps, an upper bound of the composed norm):

- dropping an alpha channel: a projection, norm 1;
- RGB → gray by averaging the three channels: norm 1/√3 (radius × √3);
- gray → RGB by copying the channel: norm √3 (radius / √3);
- area downsampling by an integer factor ``k`` (mean of k×k blocks): norm 1/k (radius × k);
- any other resize: PIL's bilinear resize in float mode, which is separable and linear,
  ``X ↦ R_h X R_wᵀ`` per channel, so its norm is exactly ``‖R_h‖₂·‖R_w‖₂``; the two 1-D
  matrices are read off PIL itself by resizing identity images (sides up to 4096 pixels), and
  the clip to [0, 1] afterwards is a projection (norm 1);
- a palette image: its pixels *are* its colours (the lookup is exact), then as RGB;
- a CMYK image: converted in float, ``R = (1 − C)(1 − K)`` (and G, B alike, PIL's formula
  without its rounding), whose Jacobian ``[diag(K − 1) | −(1 − C, 1 − M, 1 − Y)ᵀ]`` has norm at
  most 2 on [0, 1]⁴: norm 2;
- same size: identity.

Anything else (a 32-bit integer or float image, whose [0, 1] scale is unknown) makes the
uploaded radius unknown: it is reported as ``None``. The float32 rounding of the model input
(≤ 2⁻²³·√n in L2 between two inputs of n values) is covered by the radius' own slack, which
already subtracts at least 2⁻¹²·L of margin (n ≤ 2²² for every model lipcert serves).
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import (
    InvalidArgument,
    PayloadTooLarge,
    UnprocessableEntity,
    UnsupportedMediaType,
    one_line,
)

#: Raster formats PIL may try; EPS/PDF and other plugins that run external programs are excluded.
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")

# Modes whose pixels map linearly onto [0, 1] with a known full scale.
_FULL_SCALE = {"1": 1.0, "L": 255.0, "LA": 255.0, "RGB": 255.0, "RGBA": 255.0,
               "I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0}


@dataclass(frozen=True)
class ImageLimits:
    """Upload limits.

    Args:
        max_bytes: largest accepted upload, in bytes (default 8 MiB).
        max_pixels: largest accepted width × height, checked before decoding (default 2²² ≈ 4.2 M).
    """

    max_bytes: int = 8 * 2**20
    max_pixels: int = 2**22


@dataclass(frozen=True)
class Preprocessed:
    """One upload mapped to a model's input.

    Attributes:
        array: ``(C, H, W)`` float32 in [0, 1], the model input.
        norm: an upper bound of the operator norm of the (linear) map from the upload's [0, 1]
            pixels to ``array``; ``None`` when the map is not linear or its norm is not known.
        steps: the steps applied, for the response (e.g. ``["rgb->gray(mean)", "area/4"]``).
        uploaded_size: ``(height, width, channels)`` of the upload.
    """

    array: np.ndarray
    norm: float | None
    steps: tuple[str, ...]
    uploaded_size: tuple[int, int, int]


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode uploaded bytes into a fully loaded PIL image (first frame).

    Args:
        data: the raw upload.
        limits: byte and pixel limits.

    Returns:
        The decoded image.

    Raises:
        InvalidArgument: empty, truncated or corrupt data (400).
        PayloadTooLarge: more than ``limits.max_bytes`` bytes or ``limits.max_pixels`` pixels (413).
        UnsupportedMediaType: not an image in one of :data:`IMAGE_FORMATS` (415).
    """
    if not data:
        raise InvalidArgument("the image upload is empty")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(
            f"the image upload has {len(data)} bytes; the limit is {limits.max_bytes}"
        )
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise UnsupportedMediaType(
            "the upload is not an image in a supported format "
            f"({', '.join(f.lower() for f in IMAGE_FORMATS)})"
        ) from None
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(one_line(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidArgument(f"the image header is corrupt: {one_line(exc)}") from None
    pixels = image.width * image.height
    if pixels > limits.max_pixels:
        raise PayloadTooLarge(
            f"the image has {image.width}x{image.height} = {pixels} pixels; "
            f"the limit is {limits.max_pixels}"
        )
    if pixels == 0:
        raise InvalidArgument(f"the image has no pixels ({image.width}x{image.height})")
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(one_line(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidArgument(f"the image data is truncated or corrupt: {one_line(exc)}") from None
    return image


def _pixels(image: Image.Image) -> tuple[np.ndarray, float | None]:
    """``(C, H, W)`` float64 pixels in [0, 1] and the norm of the map from the upload's own
    [0, 1] pixels to them (``None`` when that scale is unknown)."""
    mode = image.mode
    if mode in ("P", "PA"):  # a palette image's pixels are its colours: exact lookup
        image = image.convert("RGBA" if mode == "PA" or "transparency" in image.info else "RGB")
        mode = image.mode
    if mode == "CMYK":
        cmyk = np.asarray(image, dtype=np.float64).transpose(2, 0, 1) / 255.0
        rgb = (1.0 - cmyk[:3]) * (1.0 - cmyk[3:4])
        return rgb, 2.0
    if mode in _FULL_SCALE:
        arr = np.asarray(image, dtype=np.float64) / _FULL_SCALE[mode]
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if mode in ("LA", "RGBA"):  # drop alpha: a projection, norm 1
            arr = arr[:-1]
        return arr, 1.0
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return rgb.transpose(2, 0, 1), None


#: Largest side whose 1-D bilinear resize matrix is computed (an identity image of that side).
MAX_RESIZE_NORM_SIDE = 4096


@functools.lru_cache(maxsize=64)
def bilinear_norm(height: int, width: int, new_height: int, new_width: int) -> float | None:
    """``‖R_h‖₂·‖R_w‖₂``: the exact norm of PIL's float bilinear resize between these sizes.

    Each 1-D matrix is PIL's own: resizing an identity image along one axis only (PIL skips the
    pass of an unchanged axis) gives the matrix's columns. ``None`` above
    :data:`MAX_RESIZE_NORM_SIDE`. Rounded up by 1e-9 relative for the float64 SVD.
    """
    if max(height, width) > MAX_RESIZE_NORM_SIDE:
        return None

    def one_axis(n: int, m: int) -> float:
        eye = Image.fromarray(np.eye(n, dtype=np.float32), mode="F")
        r = np.asarray(eye.resize((n, m), Image.Resampling.BILINEAR), dtype=np.float64)
        return float(np.linalg.norm(r, ord=2))  # (m, n): column j is R e_j

    return one_axis(height, new_height) * one_axis(width, new_width) * (1 + 1e-9)


def _resize(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of each channel of ``(C, H, W)`` float pixels (PIL, float mode)."""
    channels = [
        np.asarray(
            Image.fromarray(c.astype(np.float32), mode="F").resize(
                (width, height), Image.Resampling.BILINEAR
            )
        )
        for c in arr
    ]
    return np.clip(np.stack(channels), 0.0, 1.0)


def to_model_input(image: Image.Image, shape: tuple[int, int, int]) -> Preprocessed:
    """Map a decoded upload onto a model input of ``shape = (C, H, W)``.

    Args:
        image: a loaded PIL image.
        shape: the model's input shape without the batch dimension.

    Returns:
        The model input and the norm of the map (see the module docstring).

    Raises:
        UnprocessableEntity: a channel count that cannot be mapped (422).
    """
    c, h, w = shape
    mode = image.mode
    arr, pixel_norm = _pixels(image)
    known = pixel_norm is not None
    uploaded = (arr.shape[1], arr.shape[2], arr.shape[0])
    norm = pixel_norm if pixel_norm is not None else 1.0
    steps: list[str] = [] if mode in _FULL_SCALE else [f"{mode}->rgb"]
    if arr.shape[0] != c:
        if c == 1 and arr.shape[0] == 3:
            arr = arr.mean(axis=0, keepdims=True)
            norm /= math.sqrt(3.0)
            steps.append("rgb->gray(mean)")
        elif c == 3 and arr.shape[0] == 1:
            arr = np.repeat(arr, 3, axis=0)
            norm *= math.sqrt(3.0)
            steps.append("gray->rgb(copy)")
        else:
            raise UnprocessableEntity(
                f"the image has {arr.shape[0]} channels; the model takes {c} (1 or 3 can be mapped)"
            )
    H, W = arr.shape[1:]
    if (H, W) != (h, w):
        k = H // h
        if k >= 1 and H == k * h and W == k * w:
            arr = arr.reshape(c, h, k, w, k).mean(axis=(2, 4))
            norm /= k
            steps.append(f"area/{k}")
        else:
            arr = _resize(arr, h, w)
            resize_norm = bilinear_norm(H, W, h, w)
            if resize_norm is None:
                known = False
            else:
                norm *= resize_norm
            steps.append(f"bilinear {W}x{H}->{w}x{h}")
    return Preprocessed(
        array=np.ascontiguousarray(arr, dtype=np.float32),
        norm=norm if known else None,
        steps=tuple(steps),
        uploaded_size=uploaded,
    )
