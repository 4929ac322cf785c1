"""Exact singular values of every method's layer (4 channels, 8×8), at init and after 20
adversarial optimizer steps: ``python scripts/exact_norms.py``."""

from __future__ import annotations

import copy

import torch

from models import create_layer, list_methods
from tests.lipschitz_utils import adversarial_steps, singular_values


def main() -> None:
    print("| method | k | max σ at init | max σ after 20 adversarial steps | min σ after |")
    print("|---|---|---|---|---|")
    for method in list_methods():
        for k in (1, 3):
            torch.manual_seed(0)
            layer = create_layer(method, 4, k).eval()
            x = torch.randn(1, 4, 8, 8)
            s0 = singular_values(copy.deepcopy(layer), x)
            adversarial_steps(layer, (4, 8, 8), steps=20)
            layer.eval()
            s1 = singular_values(copy.deepcopy(layer), x)
            print(f"| {method} | {k} | {s0.max():.6f} | {s1.max():.6f} | {s1.min():.6f} |")


if __name__ == "__main__":
    main()
