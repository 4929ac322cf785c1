"""Standard: an unconstrained convolution, the baseline of Prach et al. (CVPR 2024).

Guarantee: none. It is *not* 1-Lipschitz; certificates for it use the audited bound of the
exported network (usually far above 1) so radii stay correct, just small.
Padding: circular (as the other circular methods, so the comparison is like for like).
Inference: one plain circular convolution.
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers.base import LipschitzConv2d
from models.ops import circular_conv2d
from models.plain import CircularConv2d
from models.registry import register_method


@register_method("standard")
class StandardConv2d(LipschitzConv2d):
    """Plain ``Conv2d`` with circular padding and an orthogonal init.

    torch's default (Kaiming-uniform with a = √5) shrinks the signal by about 1/√3 per layer;
    through the ~17 unnormalized layers of a LipNet the logits then barely move and training
    stalls at chance. An orthogonal ``(c, c·k·k)`` matrix keeps the signal norm instead.
    """

    padding = "circular"
    lipschitz = False
    orthogonal = False

    def __init__(self, channels: int, kernel_size: int = 3, *, bias: bool = True) -> None:
        super().__init__(channels, kernel_size, bias=bias)
        self.weight = nn.Parameter(torch.empty(channels, channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        nn.init.orthogonal_(self.weight)
        self.init_bias_uniform()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return circular_conv2d(x, self.weight, self.bias)

    def export(self) -> nn.Module:
        return CircularConv2d(self.weight, self.bias)
