"""LOT: Layer-wise Orthogonal Training.

Xu, Li & Li, "LOT: Layer-wise Orthogonal Training on Improving ℓ2 Certified Robustness",
NeurIPS 2022, arXiv:2210.11620.

Guarantee: 1-Lipschitz (up to the Newton–Schulz approximation, which converges to it from
below, see :func:`models.ops.newton_schulz_inverse_sqrt`). Per frequency of the circular
convolution on the zero-padded size ``N = n + 2p``: ``S = ŴŴᴴ + 1e-4·I``,
``S ← S / (‖S‖_F + 1e-4)``, ``Z ≈ S^(-1/2)`` by 10 coupled Newton–Schulz steps and
``Q = Z·Ŵ / √(‖S‖_F + 1e-4) ≈ (ŴŴᴴ)^(-1/2)Ŵ``, the orthogonal polar factor of ``Ŵ`` (all
singular values ``σ/√(σ² + 1e-4) <= 1``; ≈ 1 unless a frequency of ``Ŵ`` is near-singular).
The circular operator on ``N`` is (approximately) orthogonal; with the crop it is a compression
of an orthogonal map: 1-Lipschitz, not orthogonal, so ``orthogonal = False`` here (the generic
test measures the cropped layer).
Padding: zero padding ``p = k // 2``, then circular convolution on ``N × N``, then crop back to
``n × n`` (the paper's code). ``kernel_size=1`` needs no padding: one orthogonal matrix.
Arithmetic: complex64 (complex128 when the layer is double); never half precision.
Init: Dirac (identity), as the reference code.
Inference: :class:`models.plain.FourierConv2d` with ``pad = p`` (folded into its DFT matrices) at a
fixed size, or a plain 1×1 convolution for ``kernel_size=1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.base import LipschitzConv2d
from models.layers.cayley import FourierSizeMixin
from models.ops import apply_spectrum, circular_conv_spectrum, newton_schulz_inverse_sqrt
from models.plain import CircularConv2d, FourierConv2d
from models.registry import register_method


def lot_orthogonalize(w_hat: torch.Tensor, iters: int = 10, eps: float = 1e-4) -> torch.Tensor:
    """LOT's ``(ŴŴᴴ)^(-1/2)Ŵ`` by Newton–Schulz, batched over the leading dims.

    Args:
        w_hat: ``(..., c_out, c_in)`` real or complex.
        iters: Newton–Schulz steps (the paper: 10).
        eps: the paper's regularizer of ``S`` and of its norm.
    """
    eye = torch.eye(w_hat.shape[-2], dtype=w_hat.dtype, device=w_hat.device)
    s = w_hat @ w_hat.transpose(-1, -2).conj() + eps * eye
    norm = torch.linalg.matrix_norm(s, ord="fro", keepdim=True) + eps
    z = newton_schulz_inverse_sqrt(s / norm, iters=iters)
    return z @ w_hat / norm.sqrt()


@register_method("lot")
class LOTConv2d(FourierSizeMixin, LipschitzConv2d):
    """LOT convolution: zero pad, orthogonal circular convolution on the padded size, crop.

    Args:
        channels: input = output channels.
        kernel_size: odd kernel size.
        bias: learned bias.
        iters: Newton–Schulz steps (10, in training and at evaluation as the paper).
        input_size: the spatial size the exported form is for, when ``export()`` is called before
            any forward pass (the network passes it); the last forward's size wins otherwise.
    """

    padding = "zero"
    lipschitz = True
    orthogonal = False

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        *,
        bias: bool = True,
        iters: int = 10,
        input_size: int | None = None,
    ) -> None:
        super().__init__(channels, kernel_size, bias=bias)
        self.iters = iters
        weight = torch.zeros(channels, channels, kernel_size, kernel_size)
        weight[:, :, kernel_size // 2, kernel_size // 2] = torch.eye(channels)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.input_size = input_size

    def spectrum(self, size: int, weight: torch.Tensor | None = None) -> torch.Tensor:
        """One-sided ``Q(f)`` of the circular convolution on ``size × size`` (the padded size)."""
        w = self.weight if weight is None else weight
        if self.kernel_size == 1:
            return lot_orthogonalize(w[:, :, 0, 0], self.iters)[None, None].to(
                torch.complex128 if w.dtype == torch.float64 else torch.complex64
            )
        return lot_orthogonalize(circular_conv_spectrum(w, size, onesided=True), self.iters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self._remember_size(x)
        if self.kernel_size == 1:
            q = self.cached("q1", lambda: lot_orthogonalize(self.weight[:, :, 0, 0], self.iters))
            return F.conv2d(x, q[:, :, None, None], self.bias)
        p = self.kernel_size // 2
        size = n + 2 * p
        q = self.cached(("q", size), lambda: self.spectrum(size))
        y = apply_spectrum(F.pad(x, (p, p, p, p)), q)[..., p:-p, p:-p]
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def circular_operator(self, n: int) -> nn.Module:
        """The uncropped circular convolution on the padded size ``n + 2p`` (for analysis)."""
        size = n + 2 * (self.kernel_size // 2)
        with torch.no_grad():
            return FourierConv2d(self.spectrum(size, self.weight.double()))

    @torch.no_grad()
    def export(self, input_size: int | None = None) -> nn.Module:
        """A :class:`FourierConv2d` (``pad = k//2``) for ``input_size``; 1×1 conv when k = 1.

        Raises:
            ValueError: when the size is unknown (never run, none given).
        """
        w = self.weight.double()
        if self.kernel_size == 1:
            return CircularConv2d(self.spectrum(1, w)[0, 0].real[:, :, None, None], self.bias)
        n = self._export_size(input_size)
        p = self.kernel_size // 2
        return FourierConv2d(self.spectrum(n + 2 * p, w), self.bias, pad=p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, iters={self.iters}"
