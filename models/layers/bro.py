"""BRO: Block Reflector Orthogonal convolution.

Lai, Huang, Kung & Chen (BRONet), "Enhancing Certified Robustness via Block
Reflector Orthogonal Layers and Logit Annealing Loss", ICML 2025, arXiv:2505.15174 (reference
code: ``ntuaislab/BRONet``, ``lipconvnet/models/layers/bro.py``).

Construction: a low-rank kernel ``V`` (``c × r × k × k``, ``r = c/2`` by default as BRONet's main
configuration) is taken to the Fourier domain of the zero-padded size ``N = n + 2p``; per
frequency ``W(f) = I − 2V̂(V̂ᴴV̂ + δI)⁻¹V̂ᴴ`` (:func:`models.ops.block_reflector`), and
``y = crop(irfft2(W · rfft2(pad(x)))) + b``. No iteration, no series: one ``r × r`` solve per
frequency.

Guarantee: ``W(f)`` is Hermitian with spectrum in ``[−1, 1]`` for any ``V`` (the regularizer
``δ = 1e-5 · mean diag(V̂ᴴV̂)``, as the reference, only moves eigenvalues ``−1`` towards ``+1``),
so the circular convolution on ``N × N`` has norm ≤ 1 exactly and is orthogonal up to
``δ/σ²``. Padding an isometry, cropping a projection: the layer is 1-Lipschitz, not orthogonal
(``orthogonal = False``, as LOT), on every input size. A scalar phase per frequency cancels in
``W``, so the result does not depend on where the kernel's taps are centred.
Padding: zero padding ``p = k // 2``, circular convolution on ``N × N``, crop back to ``n × n``
(the reference's ``F.pad`` + FFT + crop). ``kernel_size = 1`` needs no padding: one ``c × c``
reflector, a plain 1×1 convolution.
Init: identity on the first ``r`` channels (``V[i, i, centre] = 1``, the reference's
``id_init``), so ``W`` starts as the fixed reflection ``diag(−I_r, I_{c−r})``; bias uniform in
``±1/√(r k²)`` as the reference.
Arithmetic: complex64 in training (complex128 when the layer is double); export in complex128.
Inference: :class:`models.plain.FourierConv2d` with ``pad = p`` at a fixed size (real DFT GEMMs, the
zero pad and the crop folded into the DFT matrices), whose ``lipschitz_upper_bound`` covers both.

Departures: the reference regularizes with ``δ = 1e-5 · mean diag`` only; we add a floor
(``√tiny``) so that a frequency where ``V̂ = 0`` gives ``W = I`` instead of a singular solve.
The per-frequency matrices come from :func:`models.ops.circular_conv_spectrum` (the convention
every lipcert FFT layer shares) rather than ``rfft2(V, norm="ortho")``; ``W`` is invariant to the
scale of ``V`` (up to ``δ``) and to per-frequency phases, so the layer family is the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.base import LipschitzConv2d
from models.layers.cayley import FourierSizeMixin
from models.ops import apply_spectrum, block_reflector, circular_conv_spectrum
from models.plain import CircularConv2d, FourierConv2d
from models.registry import register_method


@register_method("bro")
class BROConv2d(FourierSizeMixin, LipschitzConv2d):
    """Block reflector orthogonal convolution: zero pad, per-frequency reflector, crop.

    Args:
        channels: input = output channels.
        kernel_size: odd kernel size.
        bias: learned bias.
        rank: columns of ``V`` (1 … channels); default ``max(1, channels // 2)``.
        eps: relative regularizer of ``V̂ᴴV̂`` (the reference: 1e-5).
        input_size: the spatial size the exported form is for, when ``export()`` is called before
            any forward pass (the network passes it); the last forward's size wins otherwise.

    Raises:
        ValueError: a bad ``rank`` or ``eps``.
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
        rank: int | None = None,
        eps: float = 1e-5,
        input_size: int | None = None,
    ) -> None:
        super().__init__(channels, kernel_size, bias=bias)
        rank = max(1, channels // 2) if rank is None else rank
        if not isinstance(rank, int) or not 1 <= rank <= channels:
            raise ValueError(f"rank must be an int in 1..{channels}, got {rank!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.rank, self.eps = rank, float(eps)
        weight = torch.zeros(channels, rank, kernel_size, kernel_size)
        weight[torch.arange(rank), torch.arange(rank), kernel_size // 2, kernel_size // 2] = 1.0
        self.weight = nn.Parameter(weight)
        self.bias = None
        if bias:
            bound = 1 / math.sqrt(rank * kernel_size**2)
            self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound))
        self.input_size = input_size

    def matrix(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The ``c × c`` reflector of a 1×1 layer."""
        w = self.weight if weight is None else weight
        return block_reflector(w[:, :, 0, 0], self.eps)

    def spectrum(self, size: int, weight: torch.Tensor | None = None) -> torch.Tensor:
        """One-sided ``W(f)`` of the circular convolution on ``size × size`` (the padded size)."""
        w = self.weight if weight is None else weight
        return block_reflector(circular_conv_spectrum(w, size, onesided=True), self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self._remember_size(x)
        if self.kernel_size == 1:
            q = self.cached("q1", self.matrix)
            return F.conv2d(x, q[:, :, None, None], self.bias)
        p = self.kernel_size // 2
        size = n + 2 * p
        q = self.cached(("q", size), lambda: self.spectrum(size))
        y = apply_spectrum(F.pad(x, (p, p, p, p)), q)[..., p:-p, p:-p]
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    @torch.no_grad()
    def export(self, input_size: int | None = None) -> nn.Module:
        """A :class:`FourierConv2d` (``pad = k//2``) for ``input_size``; 1×1 conv when k = 1.

        Raises:
            ValueError: when the size is unknown (never run, none given).
        """
        w = self.weight.double()
        if self.kernel_size == 1:
            return CircularConv2d(self.matrix(w)[:, :, None, None], self.bias)
        n = self._export_size(input_size)
        p = self.kernel_size // 2
        return FourierConv2d(self.spectrum(n + 2 * p, w), self.bias, pad=p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"
