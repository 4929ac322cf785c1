"""Sandwich: the 1-Lipschitz layer of Lipschitz-bounded deep networks (LBDN).

Wang & Manchester, "Direct Parameterization of Lipschitz-Bounded Deep Networks", ICML 2023,
arXiv:2301.11526 (reference code: ``acfr/LBDN``, ``layer.py``: ``SandwichConv``, ``SandwichLin``).

Construction: a kernel ``W`` of shape ``c × 2c × k × k``; per frequency of the circular
convolution on ``n × n``, ``Ŵ(f)`` (``c × 2c``) is scaled to ``α·Ŵ/‖W‖_F`` and mapped by the
Cayley transform for rectangular matrices (:func:`cayley_rows`) to ``[A(f) B(f)]`` with
orthonormal rows, ``AAᴴ + BBᴴ = I``. With a learned per-channel ``Ψ = diag(e^ψ)`` and bias ``b``::

    y = √2·AᴴΨ·ReLU(√2·Ψ⁻¹B x + b)

Guarantee: 1-Lipschitz *including its ReLU* for every input size (the paper's Theorem 3.1: the
ReLU differences are ``D·Δz`` with ``D`` diagonal in ``[0, 1]``, it commutes with ``Ψ``, and
``‖2AᴴDB‖ ≤ 1`` whenever ``AAᴴ + BBᴴ ⪯ I``; see
:meth:`models.plain.Sandwich2d.lipschitz_upper_bound`).
No approximation: the Cayley transform is exact up to rounding. Not orthogonal. With
``activation=False`` the layer is the paper's linear last layer ``SandwichLin`` (``AB=False``):
``y = B x + b``, norm ≤ 1 since ``BBᴴ ⪯ I``.
Padding: circular (the FFT is circular, as the reference); the layer takes the input size from
its input (results cached per size in eval mode). ``kernel_size = 1``: one ``c × 2c`` matrix,
no FFT.
Init (departure, ``init="identity"``, the default): ``W = [0, −(√2 − 1)·I]`` at the centre tap and
``b = 0``, for which ``A = B = I/√2`` at every frequency and the layer is exactly ``ReLU(x + b)``
(the linear form ``x/√2``). The reference's init (``init="reference"``: torch's ``Conv2d`` default
for ``W`` and ``b``, as its ``nn.Conv2d`` subclass) shrinks differences ~10× per LipNet block of
three layers, whose 11 (xxs) to 27 (XS) sandwich layers are far deeper than the paper's 4–7: on
digits xxs at init the gain of a small perturbation is 0.53 after the stem and 7e-4 after the
last block, the logits have std 0.06, and SGD stayed at chance (10 % clean after 300 steps at lr
1e-2 and 3e-2, 19 % at 1e-1). Both: ``ψ = 0``, ``α = ‖W‖_F``.
Inference: :class:`models.plain.Sandwich2d` over two :class:`models.plain.FourierConv2d` (two 1×1
:class:`models.plain.CircularConv2d` when k = 1), audited by the sandwich bound; the linear form
exports to one ``FourierConv2d`` / ``CircularConv2d``.

Block shape in LipNet: the layer carries its own activation (``includes_activation``), so the
network puts no MaxMin after it; the stem is a 1×1 sandwich with its ReLU and the head the linear
form (``head_options``), as the paper's networks end in ``SandwichLin``.

Departures: like lipcert's Cayley layer we divide by ``‖W‖_F`` (by Parseval the full-grid RMS of
``Ŵ``) rather than by the one-sided grid norm, and create ``α`` in ``__init__`` (the reference
creates it lazily on the first forward, after the optimizer may have been built); at init
``α·Ŵ/‖W‖_F = Ŵ`` as in the paper. Stride 2 (the reference's space-to-depth inside the layer) is
not used: LipNet downsamples with PixelUnshuffle between blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.base import LipschitzConv2d
from models.layers.cayley import FourierSizeMixin
from models.ops import apply_spectrum, circular_conv_spectrum
from models.plain import CircularConv2d, FourierConv2d, Sandwich2d
from models.registry import register_method


def cayley_rows(w: torch.Tensor) -> torch.Tensor:
    """Cayley transform of a wide ``(..., c, m)`` matrix (``m ≥ c``) onto orthonormal rows.

    With ``W = [U V]`` (``U`` square), ``S = Uᵀ − conj(U) + conj(V)Vᵀ`` (skew-Hermitian plus
    ``VᴴV`` in the tall form) and ``Q = [(I + S)⁻¹(I − S); −2Vᵀ(I + S)⁻¹]ᵀ``:
    ``QQᴴ = I`` exactly (the Cayley map of the Stiefel manifold, as the reference's ``cayley``).
    """
    c = w.shape[-2]
    tall = w.transpose(-1, -2)  # (..., m, c)
    u, v = tall[..., :c, :], tall[..., c:, :]
    eye = torch.eye(c, dtype=w.dtype, device=w.device)
    s = u - u.transpose(-1, -2).conj() + v.transpose(-1, -2).conj() @ v
    inv = torch.linalg.inv(eye + s)
    return torch.cat([inv @ (eye - s), -2 * v @ inv], dim=-2).transpose(-1, -2)


@register_method("sandwich")
class SandwichConv2d(FourierSizeMixin, LipschitzConv2d):
    """Sandwich layer: ``√2·AᴴΨ·ReLU(√2·Ψ⁻¹B x + b)`` by FFT (circular padding).

    Args:
        channels: input = output channels.
        kernel_size: odd kernel size.
        bias: learned bias.
        activation: True (default) for the sandwich with its ReLU; False for the linear
            ``y = B x + b`` (the paper's last layer).
        init: ``"identity"`` (default: the layer starts as ``ReLU(x + b)``, see the module
            docstring) or ``"reference"`` (torch's ``Conv2d`` init, as the reference code).
        input_size: the spatial size the exported form is for, when ``export()`` is called before
            any forward pass (the network passes it); the last forward's size wins otherwise.

    Raises:
        ValueError: ``activation`` not a bool, or an unknown ``init``.
    """

    padding = "circular"
    lipschitz = True
    orthogonal = False
    #: LipNet puts no activation module after a layer that includes one (per instance).
    includes_activation = True
    #: The head is the linear form (the stem keeps the ReLU).
    head_options = {"activation": False}

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        *,
        bias: bool = True,
        activation: bool = True,
        init: str = "identity",
        input_size: int | None = None,
    ) -> None:
        super().__init__(channels, kernel_size, bias=bias)
        if not isinstance(activation, bool):
            raise ValueError(f"activation must be True or False, got {activation!r}")
        if init not in ("identity", "reference"):
            raise ValueError(f"unknown init {init!r}; choose from identity, reference")
        self.includes_activation = activation
        conv = nn.Conv2d(2 * channels, channels, kernel_size, bias=bias)
        if init == "identity":  # Cayley of [0, −(√2−1)I] is [I, I]/√2 at every frequency
            with torch.no_grad():
                conv.weight.zero_()
                mid = kernel_size // 2
                conv.weight[:, channels:, mid, mid] = (1 - math.sqrt(2)) * torch.eye(channels)
                if bias:
                    conv.bias.zero_()
        self.weight = nn.Parameter(conv.weight.detach().clone())  # (c, 2c, k, k)
        self.bias = nn.Parameter(conv.bias.detach().clone()) if bias else None
        self.alpha = nn.Parameter(self.weight.detach().norm().reshape(()))
        self.psi = nn.Parameter(torch.zeros(channels)) if activation else None
        self.input_size = input_size

    def spectrum(self, n: int, weight: torch.Tensor | None = None) -> torch.Tensor:
        """One-sided ``[A(f) B(f)]`` with orthonormal rows: ``(n, n//2+1, c, 2c)`` complex.

        For ``kernel_size = 1`` the one real ``(c, 2c)`` matrix (``n`` is ignored).
        """
        w = self.weight if weight is None else weight
        scale = self.alpha.to(w.dtype) / w.norm()
        if self.kernel_size == 1:
            return cayley_rows(scale * w[:, :, 0, 0])
        return cayley_rows(scale * circular_conv_spectrum(w, n, onesided=True))

    def maps(self, n: int, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """``(inner, outer)``: ``√2Ψ⁻¹B`` and ``√2Aᴴ`` per frequency (``B`` alone if linear)."""
        q = self.spectrum(n, weight)
        c = self.channels
        a, b = q[..., :c], q[..., c:]
        if not self.includes_activation:
            return (b,)
        inv_psi = torch.exp(-self.psi.to(self.alpha.dtype if weight is None else weight.dtype))
        inv_psi = inv_psi.to(q.dtype)
        return (
            math.sqrt(2) * inv_psi[:, None] * b,
            math.sqrt(2) * a.transpose(-1, -2).conj(),
        )

    def _apply_map(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if self.kernel_size == 1:
            return F.conv2d(x, m[:, :, None, None])
        return apply_spectrum(x, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self._remember_size(x)
        maps = self.cached(("maps", 1 if self.kernel_size == 1 else n), lambda: self.maps(n))
        z = self._apply_map(x, maps[0])
        if self.bias is not None:
            z = z + self.bias.view(1, -1, 1, 1)
        if not self.includes_activation:
            return z
        h = F.relu(z) * torch.exp(self.psi).view(1, -1, 1, 1)
        return self._apply_map(h, maps[1])

    @torch.no_grad()
    def export(self, input_size: int | None = None) -> nn.Module:
        """The plain form: :class:`Sandwich2d` (or the linear map alone) at ``input_size``.

        Raises:
            ValueError: when k > 1 and the size is unknown (never run, none given).
        """
        w = self.weight.double()
        if self.kernel_size == 1:
            maps = [CircularConv2d(m[:, :, None, None]) for m in self.maps(1, w)]
        else:
            maps = [FourierConv2d(m) for m in self.maps(self._export_size(input_size), w)]
        if self.bias is not None:  # the bias goes with the first map (before the ReLU)
            maps[0].bias = self.bias.detach().float().clone()
        if not self.includes_activation:
            return maps[0]
        return Sandwich2d(maps[0], maps[1], torch.exp(self.psi.double()))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.includes_activation}"
