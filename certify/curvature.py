"""Curvature-based certificate of the CRC-Lip head (Singla & Feizi, NeurIPS 2022, arXiv:2211.08453).

The head is ``z = W₂ s(W₁h + b₁) + b₂`` with ``s`` = softplus (slope ``β``) over a body
``h = g(x)`` with Lipschitz upper bound ``L_b``. For the predicted class ``y`` and a competitor
``j`` let ``f(h) = z_y − z_j`` and ``v = w²_y − w²_j`` (rows of ``W₂``). Then

- ``∇f(h) = W₁ᵀ (v ⊙ s'(W₁h + b₁))`` and ``∇²f(h) = W₁ᵀ diag(v ⊙ s''(W₁h + b₁)) W₁`` with
  ``s'' ∈ (0, β/4]``, so ``∇²f ⪰ −m·I`` everywhere with the *proven* lower-curvature bound
  ``m = (β/4)·‖diag(√v⁻) W₁‖₂²`` (``v⁻ = max(−v, 0)``; exact SVD in float64, rounded up). The
  paper estimates this norm by power iteration (a lower estimate); we never do.
- Taylor with the mean-value form along the segment: for every ``δ``,
  ``f(h + δ) ≥ f(h) − ‖∇f(h)‖‖δ‖ − (m/2)‖δ‖²``, which stays positive for
  ``‖δ‖ < r_c = 2f/(‖∇f‖ + √(‖∇f‖² + 2mf))`` (the positive root, in a cancellation-free form).
- Also ``‖∇f‖ ≤ ‖W₁‖₂‖v‖₂ =: G`` everywhere (``s' ∈ [0, 1]``), so ``r_l = f/G`` is certified too.

The certified radius in feature space is ``min_{j≠y} max(r_c, r_l)``; in input space it is divided
by ``L_b`` (``‖x' − x‖ < r/L_b ⇒ ‖h' − h‖ < r``). As in :mod:`certify.radius`, the float slack is
subtracted from ``f`` first, ties at the top and non-finite values give 0. The paper's tighter
certificate (a Newton-solved dual problem) is only valid when its solver converges; we implement
the closed-form bound above, which needs no convergence argument.

This certificate needs the *features* ``h``, not only the logits, so it is not what the ONNX
service serves: an exported CRC-Lip model carries the logit-only *pairwise* certificate
(:mod:`certify.radius`); ``python -m certify evaluate MODEL.onnx --curvature`` reports this one
from the file's twin network and attack-checks it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from certify.radius import float_slack

#: Relative round-up of float64 SVD results (LAPACK backward error at these sizes is ~1e-14).
ROUND_UP = 1e-9
_PAIR_CHUNK = 32


@dataclass(frozen=True)
class CurvatureBounds:
    """Per ordered class pair ``(y, j)`` bounds of ``f = z_y − z_j`` (float64, zero diagonal).

    Attributes:
        lower_curvature: ``m[y, j]`` with ``∇²f ⪰ −m I`` everywhere.
        gradient: ``G[y, j]`` with ``‖∇f‖ ≤ G`` everywhere.
    """

    lower_curvature: torch.Tensor
    gradient: torch.Tensor


def _head_tensors(
    head: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``(W₁, b₁, W₂, b₂, β)`` in float64 from a :class:`models.heads.PlainCRCHead` or
    ``CRCHead``."""
    if hasattr(head, "w1"):
        w1, b1, w2, b2 = head.w1, head.b1, head.w2, head.b2
    elif hasattr(head, "linear1"):
        w1, b1 = head.linear1.weight, head.linear1.bias
        w2, b2 = head.linear2.weight, head.linear2.bias
    else:
        raise TypeError(f"{type(head).__name__} is not a CRC-Lip head (needs w1/b1/w2/b2)")
    beta = float(getattr(head, "beta", 1.0))
    return tuple(t.detach().double().cpu() for t in (w1, b1, w2, b2)) + (beta,)  # type: ignore[return-value]


@torch.no_grad()
def curvature_bounds(head: Any) -> CurvatureBounds:
    """Proven curvature and gradient bounds of every logit difference of a CRC-Lip head.

    Args:
        head: a :class:`models.heads.PlainCRCHead` (or the training ``CRCHead``).

    Returns:
        :class:`CurvatureBounds` with ``(C, C)`` matrices.
    """
    w1, _, w2, _, beta = _head_tensors(head)
    c = w2.shape[0]
    diff = w2[:, None, :] - w2[None, :, :]  # (C, C, hidden): v for (y, j)
    neg = diff.clamp(max=0).neg().sqrt().reshape(c * c, -1)  # √v⁻
    norms = torch.empty(c * c, dtype=torch.float64)
    for start in range(0, c * c, _PAIR_CHUNK):
        scaled = neg[start : start + _PAIR_CHUNK, :, None] * w1  # (P, hidden, d)
        norms[start : start + _PAIR_CHUNK] = torch.linalg.matrix_norm(scaled, ord=2)
    m = (beta / 4) * (norms * (1 + ROUND_UP)) ** 2 * (1 + ROUND_UP)
    w1_norm = float(torch.linalg.matrix_norm(w1, ord=2)) * (1 + ROUND_UP)
    g = w1_norm * diff.norm(dim=-1) * (1 + ROUND_UP)
    eye = torch.eye(c, dtype=torch.bool)
    return CurvatureBounds(m.reshape(c, c).masked_fill(eye, 0.0), g.masked_fill(eye, 0.0))


@torch.no_grad()
def curvature_radius(
    features: torch.Tensor,
    head: Any,
    lipschitz_bound: float = 1.0,
    *,
    bounds: CurvatureBounds | None = None,
) -> torch.Tensor:
    """Certified L2 input radius of each prediction of a body + CRC-Lip head.

    Args:
        features: ``(N, d)`` or ``(N, d, 1, 1)`` body outputs ``h``.
        head: the plain (or training) CRC-Lip head.
        lipschitz_bound: audited upper bound ``L_b`` of the body.
        bounds: precomputed :func:`curvature_bounds` of ``head``.

    Returns:
        ``(N,)`` float64 radii (0 where not certified, on ties and on non-finite values).

    Raises:
        ValueError: a non-positive or non-finite ``lipschitz_bound``.
    """
    if not math.isfinite(float(lipschitz_bound)) or lipschitz_bound <= 0:
        raise ValueError(f"lipschitz_bound must be finite and positive, got {lipschitz_bound!r}")
    w1, b1, w2, b2, beta = _head_tensors(head)
    bounds = curvature_bounds(head) if bounds is None else bounds
    h = features.detach().double().cpu().flatten(1)
    u = h @ w1.T + b1  # (N, hidden)
    z = torch.nn.functional.softplus(u, beta=beta) @ w2.T + b2  # (N, C)
    finite = torch.isfinite(z).all(dim=1) & torch.isfinite(h).all(dim=1)
    z = torch.where(finite[:, None], z, torch.zeros_like(z))
    u = torch.where(finite[:, None], u, torch.zeros_like(u))
    y = z.argmax(dim=1)
    z_y = z.gather(1, y[:, None])
    f = z_y - z - float_slack(z_y, z)  # (N, C)
    v = w2[y][:, None, :] - w2[None, :, :]  # (N, C, hidden)
    slope = torch.sigmoid(beta * u)[:, None, :]  # s'(u)
    grad = torch.linalg.vector_norm((v * slope) @ w1, dim=-1)  # (N, C)
    m = bounds.lower_curvature[y]  # (N, C)
    big_g = bounds.gradient[y]
    disc = (grad * grad + 2 * m * f.clamp(min=0)).sqrt()
    r_curv = torch.where(grad + disc > 0, 2 * f / (grad + disc), torch.full_like(f, math.inf))
    r_lip = torch.where(big_g > 0, f / big_g, torch.full_like(f, math.inf))
    r = torch.maximum(r_curv, r_lip)
    r = torch.where(f > 0, r, torch.zeros_like(r))
    r = r.scatter(1, y[:, None], math.inf).min(dim=1).values
    top2 = z.topk(2, dim=1).values
    ok = finite & (top2[:, 0] != top2[:, 1]) & torch.isfinite(r)
    return torch.where(ok, r / float(lipschitz_bound), torch.zeros_like(r))


@torch.no_grad()
def curvature_radii(
    plain: torch.nn.Module, images: torch.Tensor, *, body_bound: float, batch: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Curvature radii and predictions of a plain body + CRC-Lip network on a set of images.

    Args:
        plain: ``Sequential(body=..., head=Sequential(head=PlainCRCHead))`` (``LipNet.export()``
            or the twin of an exported file).
        images: ``(N, C, H, W)`` images, uint8 (scaled by 1/255) or float in [0, 1].
        body_bound: the audited body bound ``L_b``.
        batch: evaluation batch size.

    Returns:
        ``(radii, predictions)``: ``(N,)`` float64 input-space radii and ``(N,)`` class indices.
    """
    head = plain.head.head
    bounds = curvature_bounds(head)
    radii, preds = [], []
    for start in range(0, len(images), batch):
        x = images[start : start + batch].float()
        if images.dtype == torch.uint8:
            x = x / 255
        h = plain.body(x)
        radii.append(curvature_radius(h, head, body_bound, bounds=bounds))
        preds.append(head(h).argmax(1).cpu())
    return torch.cat(radii), torch.cat(preds)


@torch.no_grad()
def curvature_certified_accuracy(
    plain: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: Sequence[float],
    *,
    body_bound: float,
    batch: int = 1000,
) -> dict[str, float]:
    """Certified accuracy with the curvature certificate of a plain body + CRC-Lip network.

    Args:
        plain: ``Sequential(body=..., head=Sequential(head=PlainCRCHead))`` (``LipNet.export()``).
        images: ``(N, C, H, W)`` images, uint8 (scaled by 1/255) or float in [0, 1].
        labels: ``(N,)`` labels.
        eps: radii.
        body_bound: the audited body bound ``L_b``.
        batch: evaluation batch size.

    Returns:
        ``{eps_key: fraction}``: correct and certified at each radius.
    """
    from certify.radius import eps_key

    r, pred = curvature_radii(plain, images, body_bound=body_bound, batch=batch)
    ok = pred == labels.cpu()
    return {eps_key(e): float(((r > e) & ok).double().mean()) for e in eps}


__all__ = [
    "CurvatureBounds", "curvature_bounds", "curvature_certified_accuracy", "curvature_radii",
    "curvature_radius",
]
