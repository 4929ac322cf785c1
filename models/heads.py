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
  1-Lipschitz body. Served certificate (``pairwise``, logits only): each difference ``z_y − z_j``
  is ``‖W₁‖₂·‖w²_y − w²_j‖``-Lipschitz in the features. The paper's curvature certificate, which
  needs the features, is :mod:`certify.curvature` (python, not the ONNX service).

Both heads take the body output ``(B, d, 1, 1)`` (or ``(B, d)``) and flatten it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import check_name

#: Every head LipNet takes: its own 1x1 convolution (``linear``) or one of :data:`HEAD_CLASSES`.
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
    """CRC-Lip head: ``Linear(d, hidden) → softplus → Linear(hidden, classes)``, normalized.

    Departure from the paper (whose MLP weights are free and whose loss uses the certificates):
    ``W₁`` is divided by its spectral norm and ``W₂`` has unit rows (as LLN), so every logit
    difference is ``‖w²_y − w²_j‖ ≤ 2``-Lipschitz in the features and the offset cross-entropy of
    :mod:`training.loss` trains margins on the scale the certificates use. In training ``‖W₁‖₂``
    is a power-iteration estimate (one step per forward on a persistent vector, like the paper's
    code); :meth:`export` divides by the exact norm, and the audit recomputes every bound from the
    exported weights anyway, so the estimate only affects training.

    Args:
        in_features: feature width ``d``.
        num_classes: number of logits.
        hidden: hidden width (default ``d``, as the paper's code).
        init_iters: power-iteration steps that initialize the persistent vector.
    """

    def __init__(
        self, in_features: int, num_classes: int, *, hidden: int | None = None, init_iters: int = 50
    ) -> None:
        super().__init__()
        hidden = in_features if hidden is None else hidden
        if hidden < 1:
            raise ValueError(f"hidden must be positive, got {hidden!r}")
        self.linear1 = nn.Linear(in_features, hidden)
        self.linear2 = nn.Linear(hidden, num_classes)
        with torch.no_grad():
            v = F.normalize(torch.randn(in_features), dim=0)
            for _ in range(init_iters):
                v = F.normalize(self.linear1.weight.T @ (self.linear1.weight @ v), dim=0)
        self.register_buffer("v", v)

    def normalized_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W₁/σ, Ŵ₂)``: ``σ`` estimated in training (vector updated), exact in eval."""
        w1 = self.linear1.weight
        if self.training:
            with torch.no_grad():
                v = F.normalize(w1.T @ (w1 @ self.v), dim=0)
                self.v.copy_(v)
            sigma = (w1 @ v).norm()
        else:
            sigma = torch.linalg.matrix_norm(w1.double(), ord=2).to(w1)
        return w1 / sigma, F.normalize(self.linear2.weight, dim=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.normalized_weights()
        # Centered softplus (0 at 0): without the constant log(2)/β every hidden unit starts at
        # the same offset, which W₂ turns into large fixed class biases that training must first
        # unlearn (measured: chance accuracy for longer). The constant is folded into b₂ at export.
        hidden = F.softplus(F.linear(h.flatten(1), w1, self.linear1.bias), beta=CRC_BETA)
        return F.linear(hidden - math.log(2) / CRC_BETA, w2, self.linear2.bias)

    def curvature_penalty(self) -> torch.Tensor:
        """The curvature regularizer: an upper bound of every pair's lower-curvature bound.

        ``m_yj = (β/4)‖diag(√v⁻)W₁‖² ≤ (β/4)·‖W₁‖²·max_k v⁻_k`` with ``v = ŵ²_y − ŵ²_j``; with
        the normalized ``W₁`` this is ``(β/4)·max_{y,j,k} (ŵ²_j − ŵ²_y)_k``. Differentiable and
        never below the true bound (the paper regularizes its own curvature estimates).
        """
        _, w2 = self.normalized_weights()
        diff = w2[None, :, :] - w2[:, None, :]  # (y, j, k): ŵ²_j − ŵ²_y
        return (CRC_BETA / 4) * diff.clamp(min=0).amax()

    @torch.no_grad()
    def export(self) -> nn.Module:
        w1 = self.linear1.weight.double()
        w1 = w1 / torch.linalg.matrix_norm(w1, ord=2)
        w2 = F.normalize(self.linear2.weight.double(), dim=1)
        b2 = self.linear2.bias.double() - (math.log(2) / CRC_BETA) * w2.sum(dim=1)
        return PlainCRCHead(w1, self.linear1.bias, w2, b2)


class PlainCRCHead(nn.Module):
    """Inference form of :class:`CRCHead` (float32 buffers; Gemm, Softplus, Gemm in ONNX).

    Certificates: ``pairwise_lipschitz()`` gives proven Lipschitz constants of every logit
    difference ``z_y − z_j`` as a function of the features, ``‖W₁‖₂·‖w²_y − w²_j‖₂`` (softplus is
    1-Lipschitz). The audit turns them into the ``pairwise`` certificate that the exported model
    and the service use (logits only). The tighter, feature-dependent curvature certificate is
    :func:`certify.curvature.curvature_radius`.
    """

    certificate = "pairwise"
    beta = CRC_BETA

    def __init__(
        self, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
    ) -> None:
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

    @torch.no_grad()
    def pairwise_lipschitz(self) -> torch.Tensor:
        """``(C, C)`` float64: ``‖W₁‖₂·‖w²_y − w²_j‖₂``, rounded up, zero diagonal."""
        w2 = self.w2.double()
        dist = (w2[:, None, :] - w2[None, :, :]).norm(dim=-1) * (1 + 1e-12)
        return _exact_norm(self.w1) * dist

    def extra_repr(self) -> str:
        return f"{self.w1.shape[1]} -> {self.w1.shape[0]} -> {self.w2.shape[0]}, softplus"


#: The heads built over the flattened features: name → class ``(in_features, num_classes)``.
HEAD_CLASSES: dict[str, type[nn.Module]] = {"lln": LLNLinear, "crc": CRCHead}


def create_head(name: str, in_features: int, num_classes: int) -> nn.Module:
    """A head of :data:`HEAD_CLASSES` (``"linear"`` is LipNet's own convolution, not built here).

    Raises:
        ValueError: unknown name.
    """
    check_name("head", name, tuple(HEAD_CLASSES))
    return HEAD_CLASSES[name](in_features, num_classes)


__all__ = [
    "CRC_BETA", "HEADS", "HEAD_CLASSES", "CRCHead", "LLNLinear", "PlainCRCHead", "PlainLLNHead",
    "create_head",
]
