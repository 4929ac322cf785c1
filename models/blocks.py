"""Parameter-free building blocks of the LipNet family, each 1-Lipschitz.

- :class:`MaxMin` sorts channel pairs. We pair channel ``j`` with ``j + c/2`` (halves, as in the
  SOC code): it is a permutation on every input, so it is norm preserving and has an orthogonal
  Jacobian almost everywhere (gradient norm preserving). Exports as Split, Max, Min and Concat.
- :class:`ZeroChannelConcat` appends zero channels (an isometry).
- :class:`FirstChannels` keeps the first ``k`` channels (a projection, norm <= 1).
- :class:`InputCentering` subtracts the per-channel mean; the std stays 1 so every Lipschitz
  bound is in units of the [0, 1]-scaled input pixels.
- :class:`ZeroPad` pads spatially with zeros (an isometry), used to bring 28x28 to 32x32.
- ``nn.PixelUnshuffle`` (torch's own) is a permutation of the entries: an isometry.

And the common part of the layers with a learnable angle per channel pair (the HH activation and
the distance pool): :class:`ChannelPairs`, :func:`pair_buffer`, :func:`match_rank`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.graph_form import graph_form


class MaxMin(nn.Module):
    """MaxMin activation over channel halves: ``cat(max(a, b), min(a, b))``.

    Traced in graph form 2 (:mod:`models.graph_form`), the halves are one ``Split`` with
    constant sizes; in form 1, Slices whose bounds are computed from the traced shape.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, ...)
        if x.shape[1] % 2:
            raise ValueError(f"MaxMin needs an even channel count, got {x.shape[1]}")
        if torch.jit.is_tracing() and graph_form() >= 2:
            a, b = torch.split(x, int(x.shape[1]) // 2, dim=1)  # the channel count is static
        else:
            a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class ZeroChannelConcat(nn.Module):
    """Append zero channels up to ``out_channels``."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, out, H, W)
        missing = self.out_channels - x.shape[1]
        if missing < 0:
            raise ValueError(f"input has {x.shape[1]} channels, more than {self.out_channels}")
        return F.pad(x, (0, 0, 0, 0, 0, missing))

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}"


class FirstChannels(nn.Module):
    """Keep the first ``channels`` channels (dim 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.channels]

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class InputCentering(nn.Module):
    """Subtract a per-channel mean (a translation: Lipschitz constant exactly 1)."""

    def __init__(self, mean: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.mean

    def extra_repr(self) -> str:
        return f"mean={[round(v, 4) for v in self.mean.flatten().tolist()]}"


class ZeroPad(nn.Module):
    """Zero padding by ``pad`` pixels on each side (an isometry)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (self.pad,) * 4)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class Flatten(nn.Flatten):
    """``(B, C, 1, 1) -> (B, C)``."""


class ChannelPairs(nn.Module):
    """Base of the layers acting on channel pairs ``(j, j + c/2)`` with one learnable angle each
    (:class:`models.activations.HouseholderActivation`, :class:`models.pooling.DistancePool`).

    Args:
        channels: even number of input channels (>= 2).
        theta: initial angle of every pair.

    Raises:
        ValueError: odd, non-positive or non-int ``channels``.
    """

    def __init__(self, channels: int, theta: float) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 2 or channels % 2:
            raise ValueError(
                f"{type(self).__name__} needs an even channel count >= 2, got {channels!r}"
            )
        self.channels = channels
        self.theta = nn.Parameter(torch.full((1, channels // 2, 1, 1), float(theta)))

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(B, channels, ...)``."""
        if x.ndim < 2 or x.shape[1] != self.channels:
            raise ValueError(
                f"expected a (B, {self.channels}, ...) input, got shape {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        return f"{self.channels}"


def pair_buffer(values: torch.Tensor) -> torch.Tensor:
    """Per-pair values as a float32 ``(1, c/2, 1, 1)`` copy (a plain module's buffer)."""
    return values.detach().float().reshape(1, -1, 1, 1).clone()


def match_rank(x: torch.Tensor, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-pair ``(1, c/2, 1, 1)`` parameters reshaped for ``x`` of any rank ``(B, C, ...)``.

    Against a ``(B, C)`` or ``(B, C, L)`` input they would otherwise broadcast into a wrong shape.
    """
    if x.ndim == params[0].ndim:
        return params
    return tuple(t.reshape(1, -1, *([1] * (x.ndim - 2))) for t in params)
