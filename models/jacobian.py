"""Exact Lipschitz measurements on small inputs: the Jacobian as a matrix, its singular values,
and an adversarial attempt to break a layer's guarantee (deel-torchlip style).

For a linear layer the Jacobian is the operator itself (the identity basis pushed through it),
so its largest singular value is the layer's exact Lipschitz constant at that input size. Used by
the tests and ``scripts/exact_norms.py``.
"""

from __future__ import annotations

import torch
from torch import nn


def jacobian_matrix(f: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The Jacobian of ``f`` at a single input ``x`` (shape ``(1, C, H, W)``) as a matrix, float64.

    ``f`` is converted to float64 in place.
    """
    f = f.double()
    x = x.double()
    jac = torch.autograd.functional.jacobian(lambda t: f(t).flatten(), x)
    return jac.reshape(jac.shape[0], -1)


def singular_values(f: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The singular values of ``f``'s Jacobian at ``x`` (float64, descending)."""
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


__all__ = ["adversarial_steps", "jacobian_matrix", "singular_values"]
