"""Householder activations (HH, order 1).

Singla, Singla & Feizi, "Improved deterministic l2 robustness on CIFAR-10 and CIFAR-100",
ICLR 2022, arXiv:2108.04062, Sec. 6 ("Householder activations").

Guarantee: exactly 1-Lipschitz and gradient norm preserving. Channels are paired as in
:class:`models.blocks.MaxMin` (channel ``j`` with ``j + c/2``). For a pair ``z = (x, y)`` and a unit
vector ``v = (sin(θ/2), −cos(θ/2))`` (one learnable ``θ`` per pair)::

    σ(z) = z                    if vᵀz > 0
    σ(z) = (I − 2vvᵀ) z         otherwise   = (x cos θ + y sin θ, x sin θ − y cos θ)

On the hyperplane ``vᵀz = 0`` both branches agree, so ``σ`` is continuous and piecewise
orthogonal (Jacobian ``I`` or the reflection ``I − 2vvᵀ``): 1-Lipschitz with an orthogonal
Jacobian almost everywhere. At ``θ = π/2`` it is MaxMin exactly (``(max, min)`` in the same
order), which is the initialization, so an ``hh`` network starts as the ``maxmin`` one.

We evaluate it as ``σ(z) = z + 2v·ReLU(−vᵀz)``: the same function, continuous by construction in
floating point too (no branch can disagree with the other at the seam), and ONNX-exportable with
Mul/Add/Relu only. Departure from the paper: none in the function; its code uses a mask product.
Padding: not applicable (pointwise in space).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from models.blocks import ChannelPairs, MaxMin, match_rank, pair_buffer
from models.registry import check_name


def _householder(x: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor) -> torch.Tensor:
    """``z + 2v·ReLU(−vᵀz)`` over the channel halves of ``x`` ``(B, C, ...)``.

    ``vx, vy``: ``(1, c/2, 1, 1)``, reshaped for inputs of another rank.
    """
    vx, vy = match_rank(x, vx, vy)
    a, b = x.chunk(2, dim=1)
    s = torch.relu(-(a * vx + b * vy))  # (B, c/2, H, W): how far behind the mirror
    return torch.cat([a + 2 * vx * s, b + 2 * vy * s], dim=1)


class HouseholderActivation(ChannelPairs):
    """Order-1 Householder activation with one learnable angle per channel pair.

    Args:
        channels: even number of channels.
        theta: initial angle (default ``π/2``: MaxMin).

    Raises:
        ValueError: odd or non-positive ``channels``.
    """

    def __init__(self, channels: int, theta: float = math.pi / 2) -> None:
        super().__init__(channels, theta)

    def mirror(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The unit normal ``v = (sin(θ/2), −cos(θ/2))`` as two ``(1, c/2, 1, 1)`` tensors."""
        half = 0.5 * self.theta
        return torch.sin(half), -torch.cos(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, ...) -> (B, C, ...)
        self.check_input(x)
        vx, vy = self.mirror()
        return _householder(x, vx, vy)

    @torch.no_grad()
    def export(self) -> nn.Module:
        vx, vy = (t.double() for t in self.mirror())
        return PlainHouseholder(vx, vy)


class PlainHouseholder(nn.Module):
    """Inference form of :class:`HouseholderActivation`: the mirror normals as float32 buffers."""

    def __init__(self, vx: torch.Tensor, vy: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("vx", pair_buffer(vx))
        self.register_buffer("vy", pair_buffer(vy))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, ...) -> (B, C, ...)
        return _householder(x, self.vx, self.vy)

    @torch.no_grad()
    def lipschitz_upper_bound(self) -> float:
        """Proven bound for the stored (float32) normals.

        The map is continuous and its Jacobian is ``I`` or ``I − 2vvᵀ``, whose eigenvalues are 1
        and ``1 − 2‖v‖²``; hence the bound ``max(1, 2‖v‖² − 1)`` with ``‖v‖`` of the stored
        float32 vector (``1 ± 1e-7``), computed in float64 and rounded up.
        """
        sq = (self.vx.double() ** 2 + self.vy.double() ** 2).max().item()
        return max(1.0, 2.0 * sq - 1.0) * (1 + 1e-12)

    def extra_repr(self) -> str:
        return f"{2 * self.vx.shape[1]}"


#: The activations: name → class ``(channels)``; ``maxmin`` is the paper's.
ACTIVATION_CLASSES: dict[str, Callable[[int], nn.Module]] = {
    "maxmin": lambda channels: MaxMin(),
    "hh": HouseholderActivation,
}
ACTIVATIONS = tuple(ACTIVATION_CLASSES)


def create_activation(name: str, channels: int) -> nn.Module:
    """``"maxmin"`` → :class:`models.blocks.MaxMin`; ``"hh"`` → :class:`HouseholderActivation`.

    Raises:
        ValueError: unknown name.
    """
    check_name("activation", name, ACTIVATIONS)
    return ACTIVATION_CLASSES[name](channels)


__all__ = [
    "ACTIVATIONS", "ACTIVATION_CLASSES", "HouseholderActivation", "PlainHouseholder",
    "create_activation",
]
