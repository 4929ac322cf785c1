"""SLL: SDP-based Lipschitz Layers.

Araujo, Havens, Delattre, Allauzen & Hu, "A Unified Algebraic Perspective on Lipschitz Neural
Networks", ICLR 2023, arXiv:2303.03169.

The layer is the residual map ``y = x − Kᵀ(t ⊙ ReLU(Kx + b))`` with
``t_j = 2 / (Σ_k Σ_shifts |(KKᵀ)_jk[shift]| · q_k / q_j + eps)`` and learnable ``q > 0``. The paper
writes it ``x − 2 W T⁻¹ σ(Wᵀx + b)`` with ``W = Kᵀ`` and ``T = diag(2 / t)``.

Guarantee: 1-Lipschitz, exactly, for every input size (Theorem 3 of the paper: the weighted
Gershgorin bound gives ``T ⪰ WᵀW``, so the Jacobian ``I − 2 W T⁻¹ D Wᵀ`` has norm ≤ 1 for any
diagonal ``D ∈ [0, 1]``). With zero padding, ``K_n K_nᵀ ⪯`` a principal submatrix of the
infinite-image Gram, whose weighted row sums are at most the full ones, so the bound holds on
every ``n × n`` map. Not orthogonal (the Jacobian is the identity wherever the ReLU is off).
This is the final SLL formula, *not* the early "epsilon" variant, which is not 1-Lipschitz.
Padding: zero (``conv2d`` and its exact adjoint ``conv_transpose2d`` with the same padding).
Parametrization: ``q = exp(log_q)`` (positive by construction; the reference code uses ``|q|``);
``log_q`` starts at 0, i.e. ``q = 1`` and the layer starts as the AOL-style bound. Kernel init:
Xavier-normal; bias: uniform in ``±1/√fan_in``, as in the reference code.
Training form: :func:`models.ops.residual_conv` (the same map, ``t`` folded into the transposed
convolution's kernel; ``channels_last`` on CPU).
Inference: :class:`models.plain.ResidualConv2d` with ``scale = t`` (computed in float64).
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers.base import LipschitzConv2d
from models.ops import kernel_gram, residual_conv
from models.plain import ResidualConv2d
from models.registry import register_method


def sll_rescaling(kernel: torch.Tensor, log_q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """SLL's ``t_j = 2 / (Σ_k Σ_shifts |(KKᵀ)_jk| · q_k / q_j + eps)`` with ``q = exp(log_q)``.

    Args:
        kernel: ``(c_inner, c, k, k)`` convolution kernel ``K``.
        log_q: ``(c_inner,)`` logarithms of the positive weights ``q``.
        eps: guard of the division (makes ``t`` slightly smaller: the safe direction).

    Returns:
        ``(c_inner,)`` tensor ``t`` in the dtype of ``kernel``.
    """
    # KKᵀ over the inner channels is the Gram kernel of the transposed kernel.
    gram = kernel_gram(kernel.transpose(0, 1)).abs().sum(dim=(2, 3))  # (c_inner, c_inner)
    # Any positive weights give a valid bound, so shifting and clamping them is harmless: it only
    # keeps exp() finite and avoids 0/0 when a weight underflows.
    q = (log_q - log_q.max().detach()).exp().clamp_min(1e-30).to(kernel.dtype)
    bound = (gram @ q) / q
    return 2.0 / (bound + eps)


@register_method("sll")
class SLLConv2d(LipschitzConv2d):
    """SLL residual convolution ``y = x − Kᵀ(t ⊙ ReLU(Kx + b))``, zero padding.

    Args:
        channels: input = output channels (also the inner channels of ``K``).
        kernel_size: odd kernel size.
        bias: learned bias ``b`` inside the ReLU.
        eps: guard in the denominator of ``t``.

    Raises:
        ValueError: bad ``channels``, ``kernel_size`` or ``eps``.
    """

    padding = "zero"
    lipschitz = True
    orthogonal = False

    def __init__(
        self, channels: int, kernel_size: int = 3, *, bias: bool = True, eps: float = 1e-6
    ) -> None:
        super().__init__(channels, kernel_size, bias=bias)
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(channels, channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.log_q = nn.Parameter(torch.zeros(channels))
        nn.init.xavier_normal_(self.weight)
        self.init_bias_uniform()

    def rescaling(self) -> torch.Tensor:
        """The vector ``t`` (gradients flow in training)."""
        return sll_rescaling(self.weight, self.log_q, self.eps)

    def _eval_rescaling(self) -> torch.Tensor:
        # Same float64 path as export(), so eval forward and the exported module agree.
        return sll_rescaling(self.weight.double(), self.log_q.double(), self.eps).to(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        if self.training:
            t = self.rescaling()
        else:
            t = self.cached("t", self._eval_rescaling)
        return residual_conv(x, self.weight, self.bias, t)

    @torch.no_grad()
    def export(self) -> nn.Module:
        return ResidualConv2d(self.weight, self.bias, self._eval_rescaling())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps:g}"
