"""Losses and the learning-rate schedule.

Offset cross-entropy (Prach & Lampert, ECCV 2022; used by the comparison paper): the true
class's logit is lowered by ``m`` before a temperature-``T`` cross-entropy, so the network is
pushed to a margin of about ``m``. With ``m = 2√2·ε_train`` and a 1-Lipschitz network, a margin
``m`` certifies radius ``m / (√2·L) = 2·ε_train`` under the generic certificate; the soft margin of
the softmax keeps typical margins below ``m``, so the radii land around ``ε_train``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def offset_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, offset: float, temperature: float
) -> torch.Tensor:
    """``T · CE((z − m·onehot(y)) / T, y)``, averaged over the batch, computed in float32.

    Args:
        logits: ``(B, K)``.
        labels: ``(B,)`` int64.
        offset: ``m`` (0 gives a temperature-scaled plain cross-entropy).
        temperature: ``T > 0``.

    Returns:
        The scalar loss.
    """
    z = logits.float()
    onehot = F.one_hot(labels, z.shape[-1]).to(z.dtype)
    return temperature * F.cross_entropy((z - offset * onehot) / temperature, labels)


def one_cycle_lr(
    fraction: float,
    peak: float,
    *,
    warmup_frac: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> float:
    """One-cycle learning rate at ``fraction`` ∈ [0, 1] of training (cosine, as torch's OneCycleLR).

    Rises from ``peak/div_factor`` to ``peak`` over the first ``warmup_frac``, then anneals to
    ``peak/(div_factor·final_div_factor)`` at ``fraction = 1``. A function of the fraction (not of
    the step) so that a wall-clock budget always sees the complete schedule.
    """
    f = min(max(float(fraction), 0.0), 1.0)
    start = peak / div_factor
    end = start / final_div_factor

    def cos_interp(a: float, b: float, t: float) -> float:
        return b + (a - b) * (1 + math.cos(math.pi * t)) / 2

    if warmup_frac > 0 and f < warmup_frac:
        return cos_interp(start, peak, f / warmup_frac)
    return cos_interp(peak, end, (f - warmup_frac) / max(1e-12, 1 - warmup_frac))
