"""BCOP: Block Convolution Orthogonal Parametrization.

Li, Wang, Anil, Lucas, Grosse & Jacobsen, "Preventing Gradient Attenuation in Lipschitz
Constrained Convolutional Networks", NeurIPS 2019, arXiv:1911.00937.

Guarantee: orthogonal (all singular values 1) under circular padding, for every input size, up to
the Björck–Bowie approximation (at most 20 iterations, β = 0.5, from a pre-scaling that bounds
the spectral norm by 1; the loop stops once ``|WᵀW − I| ≤ √eps``, so it ends converged to float
precision for well-conditioned matrices and runs all 20 only for ill-conditioned ones).
Construction: ``2k − 1`` unconstrained ``c × c`` matrices are orthonormalized; the first is an
orthogonal matrix ``H``, the other ``2(k − 1)`` give symmetric projectors ``P = MMᵀ`` of rank
``⌊c/2⌋`` (M: the first half of the orthogonal columns). Each pair ``(P, R)`` is the 2×2 kernel
``[[PR, P(I−R)], [(I−P)R, (I−P)(I−R)]]`` (polynomial ``(P + (I−P)z₁)(R + (I−R)z₂)``, unitary on
the unit circle); ``k − 1`` of them are combined by matrix convolution and multiplied by ``H``.
``kernel_size=1`` is just ``H`` (the paper's orthogonal linear layer).
Padding: circular, ``k // 2``.
Training: the kernel is rebuilt every step (Björck as one autograd node that stops when
converged, all 2×2 blocks in one batched product) and applied by
:func:`models.ops.circular_conv2d` (the circular pad written once, ``channels_last`` on CPU); the
same map and gradients as the plain loop, under 0.7× the comparison paper's training step
(``python -m bench reference``, docs/bench.md).
Inference: one plain circular convolution with the kernel computed in float64.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.layers.base import LipschitzConv2d
from models.ops import bjorck, circular_conv2d
from models.plain import CircularConv2d
from models.registry import register_method


def block_orthogonal_kernel(ortho: torch.Tensor, projectors: torch.Tensor) -> torch.Tensor:
    """The ``k × k`` orthogonal kernel from an orthogonal matrix and ``2(k−1)`` projectors.

    Args:
        ortho: ``(c, c)`` orthogonal matrix.
        projectors: ``(2(k−1), c, c)`` symmetric projectors.

    Returns:
        ``(c, c, k, k)`` kernel (``F.conv2d`` layout) of an orthogonal circular convolution.
    """
    if len(projectors) == 0:
        return ortho[:, :, None, None]
    eye = torch.eye(ortho.shape[-1], dtype=ortho.dtype, device=ortho.device)
    # Coefficients of z⁰ and z¹ in P + (I−P)z: (2(k−1), 2, c, c), rows and columns alternating.
    coeffs = torch.stack([projectors, eye - projectors], dim=1)
    # (unbind and split, not indexing: their backward is one stack or cat, not zeros + copy each)
    rows, cols = coeffs.unflatten(0, (-1, 2)).unbind(1)  # (k−1, 2, c, c) each
    # All k−1 blocks [[PR, P(I−R)], [(I−P)R, (I−P)(I−R)]] in one batched product: (k−1, 2, 2, c, c).
    first, *others = (rows[:, :, None] @ cols[:, None, :]).unbind(0)
    kernel = ortho @ first  # (2, 2, c, c): spatial dims first while we build it
    for block in others:
        kernel = _matrix_conv(kernel, block)
    return kernel.permute(2, 3, 0, 1)


def _matrix_conv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Full 2-D convolution of matrix-valued kernels: ``out[i, j] = Σ a[s, t] @ b[i−s, j−t]``."""
    ka, kb = a.shape[0], b.shape[0]
    products = a[:, :, None, None] @ b[None, None]  # (ka, ka, kb, kb, c, c): every tap pair
    # shift[i, s, u] = 1 where s + u = i: the taps that land on output tap i.
    s, u = torch.arange(ka, device=a.device), torch.arange(kb, device=a.device)
    out_taps = torch.arange(ka + kb - 1, device=a.device)
    shift = (s[None, :, None] + u[None, None, :] == out_taps[:, None, None]).to(a.dtype)
    return torch.einsum("isu,jtv,stuvxy->ijxy", shift, shift, products)


class OrthogonalKernelConv2d(LipschitzConv2d):
    """A circular convolution whose k×k kernel is built orthogonal from ``self.matrices``.

    Subclasses (BCOP, AOC) define ``orthogonal_kernel(matrices=None)`` and ``bjorck_iters``;
    training convolves (:func:`models.ops.circular_conv2d`; the output is ``channels_last`` on
    CPU) with the recomputed kernel (cached in eval mode), inference is one plain
    :class:`CircularConv2d` with the kernel computed once in float64.
    """

    padding = "circular"
    lipschitz = True
    orthogonal = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return circular_conv2d(x, self.cached("weight", self.orthogonal_kernel), self.bias)

    @torch.no_grad()
    def export(self) -> nn.Module:
        return CircularConv2d(self.orthogonal_kernel(self.matrices.double()), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bjorck_iters={self.bjorck_iters}"


@register_method("bcop")
class BCOPConv2d(OrthogonalKernelConv2d):
    """BCOP orthogonal convolution with circular padding.

    Args:
        channels: input = output channels.
        kernel_size: odd kernel size.
        bias: learned bias.
        bjorck_iters: cap on the Björck–Bowie iterations (the paper runs 20 always).
    """

    def __init__(
        self, channels: int, kernel_size: int = 3, *, bias: bool = True, bjorck_iters: int = 20
    ) -> None:
        super().__init__(channels, kernel_size, bias=bias)
        self.bjorck_iters = bjorck_iters
        n_mats = 2 * (kernel_size - 1) + 1
        # Orthogonal init with gain 1/√c, as the reference implementation (LConvNet).
        mats = torch.empty(n_mats, channels, channels)
        for m in mats:
            nn.init.orthogonal_(m, gain=1 / math.sqrt(channels))
        self.matrices = nn.Parameter(mats)
        self.bias = None
        if bias:
            bound = 1 / math.sqrt(channels)
            self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound))

    def orthogonal_kernel(self, matrices: torch.Tensor | None = None) -> torch.Tensor:
        """The ``(c, c, k, k)`` orthogonal kernel (recomputed: gradients flow)."""
        ortho = bjorck(self.matrices if matrices is None else matrices, iters=self.bjorck_iters)
        h, rest = ortho.split([1, len(ortho) - 1])
        half = rest[..., : self.channels // 2]  # the first ⌊c/2⌋ columns
        return block_orthogonal_kernel(h[0], half @ half.transpose(-1, -2))
