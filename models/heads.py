"""Classification heads of Singla & Feizi: last-layer normalization (LLN) and CRC-Lip.

- **LLN**: Singla, Singla & Feizi, "Improved deterministic l2 robustness on CIFAR-10 and
  CIFAR-100", ICLR 2022, arXiv:2108.04062. Logits ``z = Ŵh + b`` with unit-norm rows
  ``ŵ_j = w_j/‖w_j‖``. Guarantee: *not* 1-Lipschitz as a whole (``‖Ŵ‖₂`` is between 1 and
  ``√num_classes``); it is certified with the linear-head certificate
  ``r = min_{j≠y} (z_y − z_j)/(L_body·‖ŵ_y − ŵ_j‖)`` (:func:`certify.certified_radius` with
  ``head=``), never with the generic ``margin/√2``. Its plain form :class:`PlainLLNHead` says so
  itself: ``lipschitz_upper_bound()`` is the exact ``‖Ŵ‖₂`` (so a whole-network bound is honest),
  ``affine = True`` and ``rows`` expose the head rows to the audit and the exporter.
- **CRC-Lip**: Singla & Feizi, "Improved techniques for deterministic l2 robustness", NeurIPS
  2022, arXiv:2211.08453. A one-hidden-layer MLP ``z = W₂ softplus(W₁h + b₁) + b₂`` over the
  1-Lipschitz body, certified through curvature bounds of ``z_y − z_j`` (see
  :mod:`certify.curvature`). Guarantee of the plain form: Lipschitz bound ``‖W₂‖₂·‖W₁‖₂`` (softplus
  is 1-Lipschitz), which is what the generic audit uses; the tighter curvature certificate needs
  the features and lives in :mod:`certify.curvature`.

Both heads take the body output ``(B, d, 1, 1)`` (or ``(B, d)``) and flatten it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("linear", "lln", "crc")
#: Softplus slope ``β``; ``softplus_β'' ∈ (0, β/4]`` is the curvature bound the certificate uses.
CRC_BETA = 1.0


def _exact_norm(w: torch.Tensor) -> float:
    """Largest singular value in float64, rounded up by a relative 1e-12 (LAPACK error)."""
    return float(torch.linalg.matrix_norm(w.detach().double(), ord=2)) * (1 + 1e-12)


class LLNLinear(nn.Module):
    """Last-layer normalization: a linear map whose rows are normalized to unit length.

    Args:
        in_features: feature width ``d`` (the body's output channels).
        num_classes: number of logits.
        bias: learned bias per class.
    """

    def __init__(self, in_features: int, num_classes: int, *, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.num_classes = in_features, num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None

    def normalized_weight(self) -> torch.Tensor:
        # F.normalize clamps the norm at 1e-12, so a zero row stays zero instead of NaN.
        return F.normalize(self.weight, dim=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, d, 1, 1) -> (B, classes)
        return F.linear(h.flatten(1), self.normalized_weight(), self.bias)

    @torch.no_grad()
    def export(self) -> nn.Module:
        w = F.normalize(self.weight.double(), dim=1)
        return PlainLLNHead(w, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.num_classes}, unit rows"


class PlainLLNHead(nn.Module):
    """Inference form of :class:`LLNLinear`: ``z = Ŵ·flatten(h) + b`` with stored unit rows.

    Attributes:
        affine: True: the head is an affine map (the audit's linear-head certificate applies).
        certificate: ``"linear_head"``: the only certificate this head may be used with.
    """

    affine = True
    certificate = "linear_head"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h.flatten(1), self.weight, self.bias)

    @property
    def rows(self) -> torch.Tensor:
        """``(num_classes, d)`` float64 rows ``ŵ_j`` for :func:`certify.certified_radius`."""
        return self.weight.double()

    @torch.no_grad()
    def lipschitz_upper_bound(self) -> float:
        """The exact ``‖Ŵ‖₂`` (≥ 1 for unit rows): the head is *not* 1-Lipschitz in general."""
        return _exact_norm(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}, unit rows"


class CRCHead(nn.Module):
    """CRC-Lip head: ``Linear(d, hidden) → softplus → Linear(hidden, classes)``.

    Args:
        in_features: feature width ``d``.
        num_classes: number of logits.
        hidden: hidden width (default ``d``, as the paper's code).
    """

    def __init__(self, in_features: int, num_classes: int, *, hidden: int | None = None) -> None:
        super().__init__()
        hidden = in_features if hidden is None else hidden
        if hidden < 1:
            raise ValueError(f"hidden must be positive, got {hidden!r}")
        self.linear1 = nn.Linear(in_features, hidden)
        self.linear2 = nn.Linear(hidden, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.softplus(self.linear1(h.flatten(1)), beta=CRC_BETA))

    def curvature_penalty(self) -> torch.Tensor:
        """A differentiable surrogate of the curvature bounds, ``(β/4)·‖W₁‖_F²·max_j ‖w²_j‖∞·2``.

        An upper bound of every pair's curvature bound (used to keep them small in training, as
        the paper's curvature regularizer does); cheap and never an estimate from below.
        """
        w1, w2 = self.linear1.weight, self.linear2.weight
        return (CRC_BETA / 4) * w1.pow(2).sum() * 2 * w2.abs().amax()

    @torch.no_grad()
    def export(self) -> nn.Module:
        return PlainCRCHead(self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias)


class PlainCRCHead(nn.Module):
    """Inference form of :class:`CRCHead` (float32 buffers; Gemm, Softplus, Gemm in ONNX).

    Attributes:
        certificate: ``"curvature"``: see :mod:`certify.curvature` (needs the features).
    """

    certificate = "curvature"
    beta = CRC_BETA

    def __init__(self, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> None:
        super().__init__()
        for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
            self.register_buffer(name, t.detach().float().clone())

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h.flatten(1), self.w1, self.b1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(F.softplus(self.hidden(h), beta=self.beta), self.w2, self.b2)

    @torch.no_grad()
    def lipschitz_upper_bound(self) -> float:
        """``‖W₂‖₂·‖W₁‖₂`` (exact norms, float64): softplus is 1-Lipschitz."""
        return _exact_norm(self.w2) * _exact_norm(self.w1)

    def extra_repr(self) -> str:
        return f"{self.w1.shape[1]} -> {self.w1.shape[0]} -> {self.w2.shape[0]}, softplus"


def create_head(name: str, in_features: int, num_classes: int) -> nn.Module:
    """``"lln"`` → :class:`LLNLinear`, ``"crc"`` → :class:`CRCHead` (``"linear"`` is LipNet's own).

    Raises:
        ValueError: unknown name.
    """
    if name == "lln":
        return LLNLinear(in_features, num_classes)
    if name == "crc":
        return CRCHead(in_features, num_classes)
    raise ValueError(f"unknown head {name!r}; choose from {', '.join(HEADS)}")


__all__ = ["CRC_BETA", "HEADS", "CRCHead", "LLNLinear", "PlainCRCHead", "PlainLLNHead", "create_head"]
