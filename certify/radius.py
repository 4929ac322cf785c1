"""Certified L2 radii from logits: pure functions, for torch tensors and numpy arrays alike.

Two certificates (both in units of the [0, 1]-scaled input image):

- **generic**, for a network with Lipschitz upper bound ``L`` (logits as a whole)::

      r = (z_y − max_{j≠y} z_j − slack) / (√2 · L)

  because ``z_y − z_j = (e_y − e_j)ᵀ z`` and ``‖e_y − e_j‖ = √2``.

- **linear head** (Singla & Feizi's "last layer normalization" argument): logits ``z = W h + b``
  over a body ``h`` with Lipschitz upper bound ``L_b``; with rows ``w_j`` of ``W``::

      r = min_{j≠y} (z_y − z_j − slack) / (L_b · ‖w_y − w_j‖₂)

  Never worse than the generic one, since ``‖w_y − w_j‖ ≤ √2 ‖W‖₂``.

``y`` is the argmax by index. A tie between the top two logits, or any NaN/Inf logit, gives
radius 0 (a public certifier was unsound on ties). A point is certified at ``ε`` iff it is
classified correctly and ``r > ε`` (strict).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: The radii the comparison paper (Prach et al., CVPR 2024) reports: 36/255, 72/255, 108/255, 1.
STANDARD_EPS: tuple[float, ...] = (36 / 255, 72 / 255, 108 / 255, 1.0)

#: Relative floating-point slack on logit differences (see :func:`float_slack`).
SLACK_REL: float = 2.0**-12
#: Absolute part of the slack, for logits near zero.
SLACK_ABS: float = 2.0**-12
#: The error model per ONNX Runtime provider: relative slack on logit differences (times
#: ``1 + |z_y| + |z_j|``). CPU (MLAS, float32 accumulation): :data:`SLACK_REL`; the suite
#: measures every method's float32-vs-float64 error against it (``tests/test_float_error.py``).
#: CUDA runs with TF32 *off* (:func:`certify.artifact.provider_options`); cuDNN may still pick
#: Winograd or FFT convolution algorithms, whose error is larger than a direct sum's, so CUDA
#: budgets 8x the CPU slack (still ~2 % of the margin at ε = 36/255). A provider not listed here
#: is budgeted like CUDA.
PROVIDER_SLACK_REL: dict[str, float] = {
    "CPUExecutionProvider": SLACK_REL,
    "CUDAExecutionProvider": 8 * SLACK_REL,
}


def slack_for_provider(provider: str) -> float:
    """The relative slack (:data:`PROVIDER_SLACK_REL`) for logits from ``provider``."""
    return PROVIDER_SLACK_REL.get(provider, PROVIDER_SLACK_REL["CUDAExecutionProvider"])


def eps_key(eps: float) -> str:
    """The dictionary key of a radius ``eps`` in :func:`certified_accuracy`: 4 decimals."""
    return f"{float(eps):.4f}"


def float_slack(
    z_y: torch.Tensor, z_j: torch.Tensor, slack_rel: float = SLACK_REL
) -> torch.Tensor:
    """Slack subtracted from the logit difference ``z_y − z_j`` before it becomes a radius.

    Derivation. The logits come from a float32 computation (ONNX Runtime or torch), not from the
    exact-arithmetic network that the Lipschitz bound is about. With unit roundoff
    ``u = 2⁻²⁴``, one layer's accumulation of ``m`` products has a worst-case relative error
    ``γ_m = m·u/(1 − m·u)`` and, under the standard model of independent rounding errors
    (Higham & Mary, SIAM J. Sci. Comput. 2019), a typical one of ``≈ √m·u``. A LipNet has at most
    ~30 layers and ``m ≤ 9·1024`` products per output (3×3 kernels at 1024 channels), so the error
    of the logits relative to their scale stays below ``30·√9216·u ≈ 2¹²·u·(…)``: we budget
    ``2¹²`` unit roundoffs per logit scale, i.e. ``2⁻¹²`` relative to ``1 + |z_y| + |z_j|`` (the
    ``1`` covers logits near zero, whose error is set by the activations rather than the logits).
    The float32 → float64 subtraction afterwards is exact. The test suite checks that this slack
    exceeds the measured float32-vs-float64 logit error of real models by orders of magnitude; it
    costs ``≈ 2.4e-4·(1 + |z_y| + |z_j|)`` of margin, about 0.2 % of the margin certifying
    ``ε = 36/255``.

    Args:
        z_y, z_j: the logits (float64 tensors, broadcastable).
        slack_rel: the relative slack (the provider's, :func:`slack_for_provider`).

    Returns:
        The non-negative slack, same shape as the broadcast inputs.
    """
    return slack_rel * (z_y.abs() + z_j.abs()) + max(SLACK_ABS, slack_rel)


def head_row_distances(head: Any) -> torch.Tensor:
    """Pairwise row distances ``D[i, j] = ‖w_i − w_j‖₂`` of a head matrix, in float64.

    Rounded up by a relative ``1e-12`` so float64 rounding of the norm can only loosen radii.

    Args:
        head: ``(num_classes, d)`` rows, a tensor or array.

    Returns:
        ``(num_classes, num_classes)`` float64 tensor with a zero diagonal.
    """
    rows = torch.as_tensor(np.asarray(head) if not torch.is_tensor(head) else head)
    rows = rows.detach().to(torch.float64).cpu()
    if rows.ndim != 2:
        raise ValueError(f"head must be a (num_classes, d) matrix, got shape {tuple(rows.shape)}")
    return torch.cdist(rows, rows) * (1 + 1e-12)


def _as_logits(logits: Any) -> tuple[torch.Tensor, bool]:
    is_numpy = not torch.is_tensor(logits)
    z = torch.as_tensor(np.asarray(logits)) if is_numpy else logits.detach().cpu()
    if z.ndim == 1:
        z = z[None]
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must be (N, num_classes >= 2), got shape {tuple(z.shape)}")
    return z.to(torch.float64), is_numpy


def _check_bound(lipschitz_bound: float) -> float:
    value = float(lipschitz_bound)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"lipschitz_bound must be a finite positive number, got {lipschitz_bound!r}"
        )
    return value


def certified_radius(
    logits: Any,
    lipschitz_bound: float = 1.0,
    head: Any = None,
    *,
    head_distances: Any = None,
    slack_rel: float = SLACK_REL,
) -> Any:
    """Certified L2 radius of each prediction.

    Args:
        logits: ``(N, C)`` or ``(C,)`` logits, torch tensor or numpy array (any float dtype).
        lipschitz_bound: upper bound of the Lipschitz constant, ``L`` of the whole network for
            the generic certificate, or ``L_b`` of the *body* when ``head``/``head_distances``
            is given.
        head: ``(C, d)`` rows ``w_j`` of the linear head (selects the linear-head certificate).
        head_distances: precomputed ``(C, C)`` matrix ``‖w_i − w_j‖₂`` (see
            :func:`head_row_distances`), an alternative to ``head``; what exported models store.
        slack_rel: relative floating-point slack of the logits' provider (default: CPU's).

    Returns:
        ``(N,)`` float64 radii (numpy in, numpy out; torch in, torch out). Zero for ties at the
        top, for non-finite logits and wherever the slack-corrected margin is not positive.

    Raises:
        ValueError: on bad shapes, a non-positive or non-finite bound, or both head forms.
    """
    z, is_numpy = _as_logits(logits)
    bound = _check_bound(lipschitz_bound)
    if head is not None and head_distances is not None:
        raise ValueError("pass either head or head_distances, not both")
    n, c = z.shape
    finite = torch.isfinite(z).all(dim=1)
    z = torch.where(finite[:, None], z, torch.zeros_like(z))  # keep the maths NaN-free
    y = z.argmax(dim=1)
    z_y = z.gather(1, y[:, None])  # (N, 1)
    if head is None and head_distances is None:
        others = z.scatter(1, y[:, None], float("-inf"))
        z_j = others.max(dim=1, keepdim=True).values
        margin = z_y - z_j - float_slack(z_y, z_j, slack_rel)
        radius = margin[:, 0] / (math.sqrt(2.0) * bound)
    else:
        if head is not None:
            dist = head_row_distances(head)
        elif torch.is_tensor(head_distances):
            dist = head_distances.detach().cpu().to(torch.float64)
        else:
            dist = torch.as_tensor(np.asarray(head_distances, dtype=np.float64))
        if dist.shape != (c, c):
            raise ValueError(
                f"head distances must be ({c}, {c}) for {c} logits, got {tuple(dist.shape)}"
            )
        margins = z_y - z - float_slack(z_y, z, slack_rel)  # (N, C)
        d_y = dist[y]  # (N, C): ‖w_y − w_j‖
        ratio = margins / (bound * d_y)
        # j = y is not a competitor; a class with the same row as y can never overtake it
        # unless it already does (then the margin is <= 0 and the radius is 0 anyway).
        ratio = torch.where(d_y > 0, ratio, torch.where(margins > 0, torch.inf, -torch.inf))
        ratio = ratio.scatter(1, y[:, None], torch.inf)
        radius = ratio.min(dim=1).values
    # Ties at the top: argmax picks the lowest index, but the certificate must not.
    top2 = z.topk(2, dim=1).values
    tie = top2[:, 0] == top2[:, 1]
    radius = torch.where(finite & ~tie & (radius > 0), radius, torch.zeros_like(radius))
    radius = radius.nan_to_num(nan=0.0)
    return radius.numpy() if is_numpy else radius


def certified_accuracy(
    logits: Any,
    labels: Any,
    eps_list: Sequence[float] = STANDARD_EPS,
    **certificate: Any,
) -> dict[str, float]:
    """Clean accuracy and certified robust accuracy at each radius.

    Args:
        logits: ``(N, C)`` logits (torch or numpy).
        labels: ``(N,)`` integer labels.
        eps_list: radii ε; a point counts at ε iff it is correct and its radius is ``> ε``.
        **certificate: forwarded to :func:`certified_radius` (``lipschitz_bound``, ``head``,
            ``head_distances``).

    Returns:
        ``{"clean": acc, eps_key(ε): cra, ...}`` with fractions in [0, 1].

    Raises:
        ValueError: when logits and labels disagree in length or there are no points.
    """
    z, _ = _as_logits(logits)
    y = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels).long().cpu()
    if y.ndim != 1 or y.shape[0] != z.shape[0]:
        raise ValueError(f"labels shape {tuple(y.shape)} does not match logits {tuple(z.shape)}")
    if y.shape[0] == 0:
        raise ValueError("no points to evaluate")
    radius = certified_radius(z, **certificate)
    correct = torch.isfinite(z).all(dim=1) & (z.argmax(dim=1) == y)
    out = {"clean": float(correct.double().mean())}
    for eps in eps_list:
        out[eps_key(eps)] = float((correct & (radius > float(eps))).double().mean())
    return out
