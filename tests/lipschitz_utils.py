"""Exact Lipschitz measurements on small inputs, shared by the tests (the layer measurements
live in :mod:`models.jacobian`; re-exported here for the tests that import them from here)."""

from __future__ import annotations

import math

import torch
from torch import nn

from models.jacobian import adversarial_steps, jacobian_matrix, singular_values

__all__ = ["adversarial_steps", "feature_attack", "jacobian_matrix", "singular_values"]


def feature_attack(head: nn.Module, h: torch.Tensor, y: torch.Tensor, radius: torch.Tensor,
                   steps: int = 200, restarts: int = 3, seed: int = 0) -> torch.Tensor:
    """PGD on ``head`` inside ``‖δ‖ < 0.999·radius`` around ``h``: the smallest margin of ``y``
    found (float64; negative = a flip inside the radius)."""
    gen = torch.Generator().manual_seed(seed)
    cap = radius[:, None] * 0.999
    best = torch.full((len(h),), math.inf, dtype=torch.float64)
    for _ in range(restarts):
        delta = torch.randn(h.shape, generator=gen, dtype=torch.float64)
        delta = delta / delta.norm(dim=1, keepdim=True) * cap * 0.5
        for _ in range(steps):
            delta.requires_grad_(True)
            z = head(h + delta)
            z_y = z.gather(1, y[:, None])[:, 0]
            margin = z_y - z.scatter(1, y[:, None], -math.inf).max(dim=1).values
            (g,) = torch.autograd.grad(margin.sum(), delta)
            with torch.no_grad():
                best = torch.minimum(best, margin.detach())
                step = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
                delta = delta.detach() - 0.1 * cap * step
                norm = delta.norm(dim=1, keepdim=True)
                delta = delta * torch.clamp(cap / norm.clamp_min(1e-30), max=1.0)
        with torch.no_grad():
            z = head(h + delta)
            z_y = z.gather(1, y[:, None])[:, 0]
            best = torch.minimum(best, z_y - z.scatter(1, y[:, None], -math.inf).max(dim=1).values)
    return best
