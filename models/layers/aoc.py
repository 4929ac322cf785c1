"""AOC: Adaptive Orthogonal Convolution.

Boissin, Mamalet, Fel, Picard, Massena & Serrurier, "An Adaptive Orthogonal Convolution Scheme for
Efficient and Flexible CNN Architectures", ICML 2025, arXiv:2501.07930 (reference code:
``thib-s/orthogonium``, ``orthogonium/layers/conv/AOC/``).

Construction (the paper's BCOP branch, which AOC uses for stride 1): ``2k`` unconstrained ``c × r``
matrices, ``r = ⌊c/2⌋`` (1 when ``c = 1``), are orthonormalized column-wise by Björck–Bowie (after a
pre-scaling that bounds every singular value by 1, :func:`models.ops.bjorck`) and give symmetric
projectors ``P_i = M_i M_iᵀ`` of rank ``r``. The first two build the ``c × c`` orthogonal matrix
``H = (I − 2P₀)(I − 2P₁)`` (a product of two block reflectors); the other ``2(k − 1)`` give the
``k − 1`` BCOP 2×2 blocks ``(P + (I−P)z₁)(R + (I−R)z₂)``, combined with ``H`` by matrix
convolution into one explicit ``k × k`` kernel (:func:`models.layers.bcop.block_orthogonal_kernel`).
Against BCOP it needs ``k·c²`` parameters instead of ``(2k − 1)·c²`` and orthonormalizes tall
``c × c/2`` matrices instead of square ones.

Guarantee: 1-Lipschitz under circular padding for every input size, *whether or not* Björck has
converged: its iteration ``σ ↦ 1.5σ − 0.5σ³`` maps ``[0, 1]`` into itself, so every ``P_i`` has
eigenvalues in ``[0, 1]``, ``I − 2P_i`` has norm ≤ 1, and each 2×2 factor is per frequency a normal
matrix with eigenvalues ``λ + (1 − λ)e^{iω}``, ``λ ∈ [0, 1]`` (modulus ≤ 1). Orthogonal (all
singular values 1) up to the Björck approximation (12 iterations by default, as the reference).
Padding: circular, ``k // 2`` (the reference's default ``padding_mode="circular"``).
Inference: one plain circular convolution with the kernel computed in float64.

Departures: lipcert's layers are square and stride 1 (LipNet downsamples with PixelUnshuffle), so
only AOC's stride-1 branch is built; its RKO branch (``stride == kernel_size``) and the
BCOP×RKO branch (stride with ``c_out > c_in``) are not needed and not implemented. Björck's
pre-scaling is lipcert's guaranteed bound (:func:`models.ops.spectral_norm_upper_bound`) instead
of the reference's 3-step power iteration (an estimate, which could leave σ slightly above 1).
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers.bcop import OrthogonalKernelConv2d, block_orthogonal_kernel
from models.ops import bjorck
from models.registry import register_method


def aoc_kernel(matrices: torch.Tensor, bjorck_iters: int = 12) -> torch.Tensor:
    """The ``(c, c, k, k)`` orthogonal kernel from ``2k`` raw ``c × r`` matrices.

    Args:
        matrices: ``(2k, c, r)`` unconstrained (gradients flow through).
        bjorck_iters: Björck–Bowie iterations.

    Returns:
        ``(c, c, k, k)`` kernel (``F.conv2d`` layout) of a circular convolution with norm ≤ 1.
    """
    ortho = bjorck(matrices, iters=bjorck_iters)  # (2k, c, r), orthonormal columns
    projectors = ortho @ ortho.transpose(-1, -2)  # (2k, c, c), eigenvalues in [0, 1]
    eye = torch.eye(projectors.shape[-1], dtype=projectors.dtype, device=projectors.device)
    h = (eye - 2 * projectors[0]) @ (eye - 2 * projectors[1])
    return block_orthogonal_kernel(h, projectors[2:])


@register_method("aoc")
class AOCConv2d(OrthogonalKernelConv2d):
    """AOC orthogonal convolution with circular padding (stride 1, square).

    Args:
        channels: input = output channels.
        kernel_size: odd kernel size.
        bias: learned bias.
        bjorck_iters: Björck–Bowie iterations (the reference: 12).

    Raises:
        ValueError: a bad ``bjorck_iters``.
    """

    def __init__(
        self, channels: int, kernel_size: int = 3, *, bias: bool = True, bjorck_iters: int = 12
    ) -> None:
        super().__init__(channels, kernel_size, bias=bias)
        if not isinstance(bjorck_iters, int) or bjorck_iters < 1:
            raise ValueError(f"bjorck_iters must be a positive int, got {bjorck_iters!r}")
        self.bjorck_iters = bjorck_iters
        rank = max(1, channels // 2)
        mats = torch.empty(2 * kernel_size, channels, rank)
        for m in mats:  # orthonormal columns: Björck starts at its fixed point
            nn.init.orthogonal_(m)
        self.matrices = nn.Parameter(mats)
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def orthogonal_kernel(self, matrices: torch.Tensor | None = None) -> torch.Tensor:
        """The ``(c, c, k, k)`` kernel (recomputed: gradients flow)."""
        return aoc_kernel(self.matrices if matrices is None else matrices, self.bjorck_iters)
