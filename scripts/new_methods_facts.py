"""Measured facts of AOC, BRO and Sandwich for docs/new_methods.md.

``OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/new_methods_facts.py``: exact singular values
(4 channels, 8×8, at init and after 20 adversarial steps), parameter counts XS–L (3×32×32,
10 classes), and per method the ONNX Runtime parity and the audited bound of an xxs network on
digits (8×8) and an XS network on 28×28 inputs, after a few adversarial steps away from the init.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import torch

from certify.audit import audit
from models import create_layer, create_model
from tests.lipschitz_utils import adversarial_steps, singular_values

METHODS = ("aoc", "bro", "sandwich")


def exact_norms() -> None:
    print("| method | k | max σ at init | max σ after 20 adversarial steps | min σ after |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        for k in (1, 3):
            torch.manual_seed(0)
            layer = create_layer(method, 4, k).eval()
            x = torch.randn(1, 4, 8, 8)
            s0 = singular_values(copy.deepcopy(layer), x)
            adversarial_steps(layer, (4, 8, 8), steps=20)
            layer.eval()
            s1 = singular_values(copy.deepcopy(layer), x)
            print(f"| {method} | {k} | {s0.max():.6f} | {s1.max():.6f} | {s1.min():.6f} |")


def parameter_counts() -> None:
    print("| method | XS | S | M | L |")
    print("|---|---|---|---|---|")
    for method in ("standard", *METHODS):
        counts = []
        for size in ("xs", "s", "m", "l"):
            with torch.device("meta"):
                model = create_model(method, size)
            counts.append(f"{sum(p.numel() for p in model.parameters()):,}")
        print(f"| {method} | {' | '.join(counts)} |")


def parity_and_bound(method: str, size: str, image: int) -> tuple[float, float, float]:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = create_model(method, size, 1, 10, image)
    adversarial_steps(model, (1, image, image), steps=3)
    model.eval()
    plain = model.export().eval()
    x = torch.rand(32, 1, image, image, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        torch.onnx.export(
            plain, (x[:1],), str(path), input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=19,
            dynamo=False,
        )
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"image": x.numpy()}
        )[0]
    with torch.no_grad():
        parity = float(np.abs(got - model(x).numpy()).max())
    result = audit(plain, (1, image, image))
    return parity, result.bound, result.lower


def parity_table() -> None:
    print("| method | model | ONNX parity (max abs) | audited bound | power-iteration lower |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        for size, image in (("xxs", 8), ("xs", 28)):
            parity, bound, lower = parity_and_bound(method, size, image)
            cells = (method, f"{size} {image}×{image}", f"{parity:.1e}", f"{bound:.6f}",
                     f"{lower:.6f}")
            print(f"| {' | '.join(cells)} |")


if __name__ == "__main__":
    exact_norms()
    print()
    parameter_counts()
    print()
    parity_table()
