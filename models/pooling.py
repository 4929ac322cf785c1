"""1-Lipschitz pooling by the signed distance to a convex cone ("LipPool").

Singla & Feizi, "Improved techniques for deterministic l2 robustness", NeurIPS 2022,
arXiv:2211.08453 (the l2 distance of an input to a set is 1-Lipschitz).

Guarantee: exactly 1-Lipschitz, gradient norm preserving (each output has a unit-norm gradient
almost everywhere). Channels are paired as in :class:`models.blocks.MaxMin` (``j`` with
``j + c/2``) and each pair ``p = (x, y)`` becomes one number, the *signed* distance from ``p`` to
the cone ``K_θ = {angle(p) ∈ [−θ/2, θ/2]}`` (``θ ∈ [0, π]`` learnable per pair, so ``K_θ`` is
convex); signed distances to a convex set are 1-Lipschitz. With ``a = θ/2``,
``n₁ = (−sin a, cos a)``, ``n₂ = (−sin a, −cos a)`` (outer normals of the two edges) and
``u₁ = (cos a, sin a)``, ``u₂ = (cos a, −sin a)`` (the edges)::

    d(p) = ‖p‖                     if ⟨p, u₁⟩ <= 0, ⟨p, u₂⟩ <= 0, x <= 0  (nearest point: the apex)
    d(p) = max(⟨p, n₁⟩, ⟨p, n₂⟩)   otherwise                           (an edge, or inside)

This is the paper's LipPool (its three angular regions) written without ``atan2`` so it exports
to ONNX with elementwise ops. In lipcert it replaces the channel halving ``FirstChannels(c/2)`` of
the *last* block (``LipNet(pool="distance")``), the final reduction to the 1×1 head input: the
halving keeps half of the channels, the pool summarizes every pair. Departure from the paper:
the paper pools at every down-sampling; the angle is clamped to ``[0, π]`` in both.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.blocks import ChannelPairs, match_rank, pair_buffer
from models.registry import check_name


def _safe_norm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``√(x² + y²)`` with a zero (not NaN) gradient at the origin, exact elsewhere."""
    sq = x * x + y * y
    pos = sq > 0
    return torch.where(
        pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), torch.zeros_like(sq)
    )


def _cone_distance(z: torch.Tensor, cos_a: torch.Tensor, sin_a: torch.Tensor) -> torch.Tensor:
    cos_a, sin_a = match_rank(z, cos_a, sin_a)
    x, y = z.chunk(2, dim=1)  # (B, c/2, ...)
    t1 = x * cos_a + y * sin_a
    t2 = x * cos_a - y * sin_a
    edge = torch.maximum(y * cos_a - x * sin_a, -(y * cos_a) - x * sin_a)
    # The apex is the nearest point exactly on the polar cone. ``x <= 0`` is implied there for
    # θ < π; at θ = π (a half-plane, reachable through the clamp, and float32 rounding of
    # cos(π/2) to a tiny negative) it keeps interior points off the apex branch, which would jump.
    apex = (t1 <= 0) & (t2 <= 0) & (x <= 0)
    # ‖(cos a, sin a)‖ is 1 only up to float32 rounding of the stored pair, and it is the slope of
    # the edge branch: on a seam ⟨p, u⟩ = 0, p = λn and ⟨p, n⟩ = λ‖n‖² = ‖p‖·‖n‖. Scaling the apex
    # branch by it makes the branches meet exactly (unscaled: a jump of ~1e-8·‖p‖, no Lipschitz
    # constant at all for the stored values).
    scale = torch.sqrt(cos_a * cos_a + sin_a * sin_a)
    return torch.where(apex, _safe_norm(x, y) * scale, edge)


class DistancePool(ChannelPairs):
    """Signed distance of each channel pair to a learnable cone: ``c`` → ``c/2`` channels.

    Args:
        channels: even input channel count.
        theta: initial opening angle in ``[0, π]`` (default ``π/2``).

    Raises:
        ValueError: odd channels or ``theta`` outside ``[0, π]``.
    """

    def __init__(self, channels: int, theta: float = math.pi / 2) -> None:
        super().__init__(channels, theta)
        if not 0 <= theta <= math.pi:
            raise ValueError(f"theta must be in [0, pi], got {theta!r}")

    def half_angle(self) -> torch.Tensor:
        return 0.5 * self.theta.clamp(0.0, math.pi)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, C, ...) -> (B, C/2, ...)
        self.check_input(z)
        a = self.half_angle()
        return _cone_distance(z, torch.cos(a), torch.sin(a))

    @torch.no_grad()
    def export(self) -> nn.Module:
        a = self.half_angle().double()
        return PlainDistancePool(torch.cos(a), torch.sin(a))


class PlainDistancePool(nn.Module):
    """Inference form of :class:`DistancePool`: ``cos(θ/2)``, ``sin(θ/2)`` as float32 buffers."""

    def __init__(self, cos_a: torch.Tensor, sin_a: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("cos_a", pair_buffer(cos_a))
        self.register_buffer("sin_a", pair_buffer(sin_a))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, C, ...) -> (B, C/2, ...)
        return _cone_distance(z, self.cos_a, self.sin_a)

    @torch.no_grad()
    def lipschitz_upper_bound(self) -> float:
        """Proven bound for the stored normals: ``max(1, max √(cos² + sin²))``, rounded up.

        Each piece is linear with gradient ``n₁`` or ``n₂`` (norm ``N = √(cos² + sin²)``) or is
        ``N·‖p‖`` (``N``-Lipschitz), and the pieces meet continuously, exactly in real arithmetic
        for the stored values (the apex branch is scaled by ``N`` for that); float32 evaluation at
        the seams is covered, like every layer's rounding, by the radius slack.
        Pairs are independent coordinates, so the layer's bound is the largest pair bound.
        """
        norm = (self.cos_a.double() ** 2 + self.sin_a.double() ** 2).sqrt().max().item()
        return max(1.0, norm) * (1 + 1e-12)

    def extra_repr(self) -> str:
        return f"{2 * self.cos_a.shape[1]} -> {self.cos_a.shape[1]}"


#: The pools: name → class ``(channels)`` (``c`` → ``c/2`` channels).
POOL_CLASSES: dict[str, type[nn.Module]] = {"distance": DistancePool}
POOLS = tuple(POOL_CLASSES)


def create_pool(name: str, channels: int) -> nn.Module:
    """A pool of :data:`POOL_CLASSES` over ``channels`` channels.

    Raises:
        ValueError: unknown name.
    """
    check_name("pool", name, POOLS)
    return POOL_CLASSES[name](channels)


__all__ = ["POOL_CLASSES", "POOLS", "DistancePool", "PlainDistancePool", "create_pool"]
