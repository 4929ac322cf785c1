"""AOL: Almost-Orthogonal Lipschitz layers.

Prach & Lampert, "Almost-Orthogonal Layers for Efficient General-Purpose Lipschitz Networks",
ECCV 2022, arXiv:2208.03160.

Guarantee: 1-Lipschitz for any input size and padding (Theorem 1: rescaling the input channels
by ``d_i = (Σ_j |KᵀK|_ij)^(-1/2)``, summed over all shifts of the Gram kernel, bounds the operator
norm by 1). Not orthogonal in general; close to it when the Gram is diagonally dominant.
No approximation: the rescaling is exact (``eps = 1e-6`` only guards the square root).
Padding: circular, as in the comparison paper's code.
Init: Dirac (identity) kernel, with which the layer starts exactly orthogonal; pass
``init="orthogonal"`` for the orthogonal-matrix init the paper uses for 1×1 first and head layers.
Inference: one plain circular convolution with the rescaled kernel (computed in float64).
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers.base import LipschitzConv2d
from models.ops import aol_rescaling, circular_conv2d
from models.plain import CircularConv2d
from models.registry import register_method


@register_method("aol")
class AOLConv2d(LipschitzConv2d):
    """AOL-rescaled circular convolution.

    Args:
        channels: input = output channels.
        kernel_size: odd kernel size.
        bias: learned bias.
        init: ``"dirac"`` (default) or ``"orthogonal"`` (centre tap a random orthogonal matrix).
    """

    padding = "circular"
    lipschitz = True
    orthogonal = False
    # The paper initializes the 1x1 stem and head with an orthogonal matrix.
    edge_options = {"init": "orthogonal"}

    def __init__(
        self, channels: int, kernel_size: int = 3, *, bias: bool = True, init: str = "dirac"
    ) -> None:
        super().__init__(channels, kernel_size, bias=bias)
        if init not in ("dirac", "orthogonal"):
            raise ValueError(f"unknown init {init!r}; choose from dirac, orthogonal")
        self.weight = nn.Parameter(torch.zeros(channels, channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        c = kernel_size // 2
        with torch.no_grad():
            if init == "dirac":
                self.weight[:, :, c, c] = torch.eye(channels)
            else:
                self.weight[:, :, c, c] = nn.init.orthogonal_(torch.empty(channels, channels))

    def rescaled_weight(self) -> torch.Tensor:
        w = self.weight
        return w * aol_rescaling(w)[None, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.cached("weight", self.rescaled_weight)
        return circular_conv2d(x, w, self.bias)

    @torch.no_grad()
    def export(self) -> nn.Module:
        w = self.weight.double()
        return CircularConv2d(w * aol_rescaling(w)[None, :, None, None], self.bias)
