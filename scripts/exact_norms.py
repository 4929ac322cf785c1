"""Exact singular values of each method's layer (4 channels, 8×8), at init and after 20
adversarial optimizer steps: ``python scripts/exact_norms.py [METHOD ...]`` (default: all)."""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence

import torch

from models import create_layer, list_methods
from models.jacobian import adversarial_steps, singular_values
from training.tables import render_markdown


def exact_norms_table(methods: Sequence[str]) -> str:
    """The markdown table of ``methods``: max σ at init, max and min σ after the attack."""
    header = ("method", "k", "max σ at init", "max σ after 20 adversarial steps", "min σ after")
    rows = []
    for method in methods:
        for k in (1, 3):
            torch.manual_seed(0)
            layer = create_layer(method, 4, k).eval()
            x = torch.randn(1, 4, 8, 8)
            s0 = singular_values(copy.deepcopy(layer), x)
            adversarial_steps(layer, (4, 8, 8), steps=20)
            layer.eval()
            s1 = singular_values(copy.deepcopy(layer), x)
            rows.append([method, k, f"{s0.max():.6f}", f"{s1.max():.6f}", f"{s1.min():.6f}"])
    return render_markdown(header, rows)


def main(argv: Sequence[str] | None = None) -> None:
    methods = list(sys.argv[1:] if argv is None else argv) or list_methods()
    print(exact_norms_table(methods), end="")


if __name__ == "__main__":
    main()
