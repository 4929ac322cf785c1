"""Plain inference modules that the method layers export to.

Every exported network is built from these, ``nn.Conv2d`` (zero padding), ``nn.Linear`` and the
blocks in :mod:`models.blocks`. They hold materialized weights as buffers (float32), contain no
parametrization, export to ONNX with standard operators, and are what :mod:`certify.audit`
bounds, one type at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def circular_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    """Circular padding by ``p`` on H and W, written with slices so every exporter maps it."""
    if p == 0:
        return x
    x = torch.cat([x[..., -p:, :], x, x[..., :p, :]], dim=-2)
    return torch.cat([x[..., -p:], x, x[..., :p]], dim=-1)


class CircularConv2d(nn.Module):
    """Stride-1 cross-correlation with circular padding ``k // 2`` (the 'same' size).

    Args:
        weight: ``(c_out, c_in, k, k)`` materialized kernel.
        bias: ``(c_out,)`` or None.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = circular_pad(x, self.weight.shape[-1] // 2)
        return F.conv2d(x, self.weight, self.bias)


def zero_padded_conv(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Conv2d:
    """An ``nn.Conv2d`` with zero padding ``k // 2`` holding the given weights (no grad)."""
    c_out, c_in, k, _ = weight.shape
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(weight.float())
        if bias is not None:
            conv.bias.copy_(bias.float())
    conv.requires_grad_(False)
    return conv


class ResidualConv2d(nn.Module):
    """``y = x − Kᵀ(scale ⊙ ReLU(Kx + b))`` with zero padding (CPL and SLL at inference).

    ``K`` is ``(c_inner, c, k, k)``; ``Kᵀ`` is its adjoint (``conv_transpose2d`` with the same
    zero padding is exactly the adjoint of ``conv2d``). ``scale`` is per inner channel (CPL: the
    constant ``2/σ²``; SLL: the vector ``t``). With ``V = diag(√scale) K``, the Jacobian is
    ``I − Vᵀ D V`` with diagonal ``D ∈ [0, 1]``, so the norm is ``max(1, ‖V‖² − 1)``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("scale", scale.detach().float().reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.weight.shape[-1] // 2
        h = F.relu(F.conv2d(x, self.weight, self.bias, padding=p)) * self.scale
        return x - F.conv_transpose2d(h, self.weight, padding=p)


class ConvExponential(nn.Module):
    """Truncated convolution exponential ``y = Σ_{i=0}^{T} Lⁱx / i! + b`` (SOC at inference).

    ``L`` is a zero-padded convolution with a skew-symmetric kernel (``L = −flip(Lᵀ)``), so the
    operator is exactly skew-symmetric and ``exp(L)`` orthogonal; the truncation at ``terms``
    makes it approximately so. Evaluated in Horner form ``z ← x + L z / i`` for ``i = T … 1``.
    """

    def __init__(self, kernel: torch.Tensor, terms: int, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.terms = int(terms)
        self.register_buffer("kernel", kernel.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.kernel.shape[-1] // 2
        z = x
        for i in range(self.terms, 0, -1):
            z = x + F.conv2d(z, self.kernel, padding=p) / i
        if self.bias is not None:
            z = z + self.bias.view(1, -1, 1, 1)
        return z

    def extra_repr(self) -> str:
        return f"terms={self.terms}"
