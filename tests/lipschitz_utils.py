"""Exact Lipschitz measurements on small inputs, shared by the tests."""

from __future__ import annotations

import math

import torch
from torch import nn


def jacobian_matrix(f: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The Jacobian of ``f`` at a single input ``x`` (shape ``(1, C, H, W)``) as a matrix, float64.

    For a linear layer this is the operator itself: pushing the identity basis through it.
    """
    f = f.double()
    x = x.double()
    jac = torch.autograd.functional.jacobian(lambda t: f(t).flatten(), x)
    return jac.reshape(jac.shape[0], -1)


def singular_values(f: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(jacobian_matrix(f, x))


def adversarial_steps(layer: nn.Module, shape: tuple[int, ...], steps: int = 20) -> None:
    """Train ``layer``'s parameters to maximize ``‖f(x) − f(y)‖ / ‖x − y‖`` (try to break it)."""
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.05)
    layer.train()
    for _ in range(steps):
        x = torch.randn(8, *shape)
        y = x + 0.1 * torch.randn_like(x)
        ratio = (layer(x) - layer(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
        opt.zero_grad()
        (-ratio.mean()).backward()
        opt.step()


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
