"""Cayley: orthogonal convolutions via the Cayley transform in the Fourier domain.

Trockman & Kolter, "Orthogonalizing Convolutional Layers with the Cayley Transform", ICLR 2021,
arXiv:2104.07167.

Guarantee: exactly orthogonal under circular padding on the input size ``n`` it is run at (the
Cayley transform of a skew-Hermitian matrix is unitary; the solve is exact up to rounding).
Construction, per frequency ``f`` of the one-sided 2-D DFT at ``n × n``:
``Ŵ(f) = Σ_s W[s] e^{2πi f·(s − k//2)/n}`` (the shifted conjugate ``rfft2`` of the paper, see
:func:`models.ops.circular_conv_spectrum`), ``V = α·Ŵ/‖W‖_F``, ``A = V − Vᴴ``,
``Q(f) = (I + A)⁻¹(I − A)``, ``y = irfft2(Q·x̂) + b``.
Departure from the paper: the paper divides by ``‖Ŵ‖_F`` over the one-sided grid and initializes
``α`` to that norm on the first forward call (so ``α`` depends on ``n`` and is created lazily,
possibly after the optimizer was built). We divide by the full-grid RMS ``‖Ŵ‖_F / n``, which by
Parseval is exactly ``‖W‖_F`` for any ``n``, and create ``α = ‖W‖_F`` in ``__init__``: at init
``V = Ŵ`` exactly as in the paper, ``α`` is a regular parameter and the layer is size-agnostic.
``kernel_size=1`` is the paper's Cayley linear layer (one matrix, no FFT).
Padding: circular (the FFT is circular); the layer needs the input size, taken from the input at
forward time (results cached per size in eval mode).
Inference: :class:`models.plain.FourierConv2d` at a fixed size (frequency-major real DFT GEMMs and
one batched per-frequency product; measured faster in ONNX Runtime than ONNX's DFT operator), or
for ``kernel_size=1`` a plain 1×1 convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.base import LipschitzConv2d
from models.ops import apply_spectrum, cayley, circular_conv_spectrum, skew
from models.plain import CircularConv2d, FourierConv2d
from models.registry import register_method


class FourierSizeMixin:
    """Input-size bookkeeping and ``export()`` for layers that need the spatial size.

    The size used by ``export`` is, in order: the ``input_size`` argument, the size of the last
    input seen by ``forward``, the ``input_size`` given to the constructor.
    """

    needs_input_size = True
    input_size: int | None
    kernel_size: int

    def _remember_size(self, x: torch.Tensor) -> int:
        n, m = x.shape[-2:]
        if n != m:
            raise ValueError(f"{type(self).__name__} needs square inputs, got {n}x{m}")
        self.input_size = int(n)
        return int(n)

    def _export_size(self, input_size: int | None) -> int:
        size = input_size if input_size is not None else self.input_size
        if size is None:
            raise ValueError(
                f"{type(self).__name__}.export() needs the input size: call the layer on an input "
                "first or pass input_size"
            )
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"input_size must be a positive int, got {size!r}")
        return size


@register_method("cayley")
class CayleyConv2d(FourierSizeMixin, LipschitzConv2d):
    """Cayley-transform orthogonal convolution (circular padding, any square input size).

    Args:
        channels: input = output channels.
        kernel_size: odd kernel size.
        bias: learned bias.
        input_size: the spatial size the exported form is for, when ``export()`` is called before
            any forward pass (the network passes it); the last forward's size wins otherwise.
    """

    padding = "circular"
    lipschitz = True
    orthogonal = True

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        *,
        bias: bool = True,
        input_size: int | None = None,
    ) -> None:
        super().__init__(channels, kernel_size, bias=bias)
        # torch's Conv2d default init (Kaiming uniform, a=√5), as the paper's nn.Conv2d subclass.
        conv = nn.Conv2d(channels, channels, kernel_size, bias=bias)
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone()) if bias else None
        self.alpha = nn.Parameter(self.weight.detach().norm().reshape(()))
        self.input_size = input_size

    def spectrum(self, n: int, weight: torch.Tensor | None = None) -> torch.Tensor:
        """One-sided per-frequency orthogonal matrices ``Q(f)``: ``(n, n//2+1, c, c)`` complex."""
        w = self.weight if weight is None else weight
        alpha = self.alpha.to(w.dtype)
        if self.kernel_size == 1:  # the same matrix at every frequency: skip the DFT
            v = alpha * w[:, :, 0, 0] / w.norm()
            return cayley(skew(v))[None, None].to(torch.complex128 if w.dtype == torch.float64
                                                   else torch.complex64)
        w_hat = circular_conv_spectrum(w, n, onesided=True)  # (n, n//2+1, c, c)
        return cayley(skew(alpha * w_hat / w.norm()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self._remember_size(x)
        if self.kernel_size == 1:
            q = self.cached("q1", lambda: self.spectrum(1)[0, 0].real)
            return F.conv2d(x, q[:, :, None, None], self.bias)
        q = self.cached(("q", n), lambda: self.spectrum(n))
        y = apply_spectrum(x, q)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    @torch.no_grad()
    def export(self, input_size: int | None = None) -> nn.Module:
        """A :class:`FourierConv2d` for ``input_size`` (a 1×1 ``CircularConv2d`` when k = 1).

        Raises:
            ValueError: when the size is unknown (never run, none given).
        """
        w = self.weight.double()
        if self.kernel_size == 1:
            return CircularConv2d(self.spectrum(1, w)[0, 0].real[:, :, None, None], self.bias)
        n = self._export_size(input_size)
        return FourierConv2d(self.spectrum(n, w), self.bias)
