"""Measured facts of AOC, BRO and Sandwich for docs/new_methods.md.

``PYTHONPATH=. python scripts/new_methods_facts.py lr-scan METHOD LR,LR,...``: 300 SGD steps of
the xxs network on digits per learning rate (batch 64, Nesterov momentum 0.9, weight decay 5e-5,
one-cycle, offset cross-entropy m = 2√2·36/255, T = 0.25), then clean accuracy and the share of
test images correct with margin/√2 > 36/255 (L = 1).

``OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/new_methods_facts.py``: exact singular values
(4 channels, 8×8, at init and after 20 adversarial steps), parameter counts XS–L (3×32×32,
10 classes), and per method the ONNX Runtime parity and the audited bound of an xxs network on
digits (8×8) and an XS network on 28×28 inputs, after 3 (xxs) or 1 (XS) adversarial steps away
from the init. About 10 minutes on a busy 2-core CPU, most of it the XS audits' power iteration.
"""

from __future__ import annotations

import copy
import math
import sys
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
    adversarial_steps(model, (1, image, image), steps=3 if size == "xxs" else 1)
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


def lr_scan(method: str, lrs: list[float], steps: int = 300) -> None:
    from training.data import load_dataset

    from training.loss import offset_cross_entropy, one_cycle_lr

    digits = load_dataset("digits")
    x, y = digits.train_images.float().div(255), digits.train_labels
    xt, yt = digits.test_images.float().div(255), digits.test_labels
    for lr in lrs:
        torch.manual_seed(0)
        model = create_model(method, "xxs", 1, 10, 8)
        opt = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-5, nesterov=True
        )
        gen = torch.Generator().manual_seed(0)
        model.train()
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = one_cycle_lr(step / steps, lr)
            idx = torch.randint(0, len(x), (64,), generator=gen)
            loss = offset_cross_entropy(model(x[idx]), y[idx], 2 * math.sqrt(2) * 36 / 255, 0.25)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            top2 = model(xt).topk(2, dim=1)
        correct = top2.indices[:, 0] == yt
        certified = correct & ((top2.values[:, 0] - top2.values[:, 1]) / math.sqrt(2) > 36 / 255)
        print(f"{method} lr={lr:g}: clean {correct.float().mean():.3f}, "
              f"CRA@36/255 {certified.float().mean():.3f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["lr-scan"]:
        lr_scan(sys.argv[2], [float(v) for v in sys.argv[3].split(",")])
        sys.exit()
    exact_norms()
    print()
    parameter_counts()
    print()
    parity_table()
