"""Peak-memory probe: one measurement per process, so measurements never pollute each other.

Run as ``python -m bench.memprobe '<json spec>'``; prints one JSON object on stdout. The
baseline is the resident set size once every library is imported and torch's lazily loaded
kernels have run once (two SGD steps of a tiny conv to train, one forward pass to infer);
``delta_mb`` is the peak RSS above it, i.e. the model, its gradients and optimizer state
(training), and the activations of the measured calls.

The peak is the kernel's per-address-space high-water mark (``VmHWM`` in ``/proc/self/status``),
reset after the imports through ``/proc/self/clear_refs``. ``getrusage``'s ``ru_maxrss`` would be
wrong here: Linux carries it across ``execve``, so a probe started from a large parent process
would report the parent's size.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from training.memory import peak_rss_bytes, reset_peak_rss


def probe(spec: dict[str, Any]) -> dict[str, float]:
    """Measure one spec: ``mode`` ∈ train | infer | onnx (see :func:`bench.layers.memory_spec`).

    Returns:
        ``baseline_mb``, ``peak_mb`` and ``delta_mb`` (peak RSS above the baseline), in MiB.

    Raises:
        ValueError: an unknown mode.
    """
    import numpy as np
    import psutil
    import torch
    import torch.nn.functional as F

    from bench.onnx_io import ort_session
    from models import create_model

    mode = spec["mode"]
    if mode not in ("train", "infer", "onnx"):
        raise ValueError(f"unknown probe mode {mode!r}; choose from train, infer, onnx")
    seed = int(spec.get("seed", 0))
    torch.manual_seed(seed)
    c, h, w = spec["input_shape"]
    batch = int(spec["batch"])
    # Load the lazily initialized convolution (and, to train, autograd and optimizer) code before
    # the baseline, so the delta is the model's, not a first call's one-off library cost.
    # Inference skips the optimizer: its first use imports torch._dynamo (about 2 s).
    warm = torch.nn.Conv2d(2, 2, 3, padding=1)
    if mode == "train":
        warm_opt = torch.optim.SGD(warm.parameters(), lr=1e-3, momentum=0.9)
        for _ in range(2):
            out = warm(torch.zeros(1, 2, 4, 4)).flatten(1)
            F.cross_entropy(out, torch.zeros(1).long()).backward()
            warm_opt.step()
        del warm_opt
    else:
        with torch.no_grad():
            warm(torch.zeros(1, 2, 4, 4))
    del warm
    reset_peak_rss()
    baseline = psutil.Process().memory_info().rss
    if mode == "onnx":
        session = ort_session(spec["onnx_path"], device="cpu")
        x = np.random.default_rng(seed).random((batch, c, h, w), dtype=np.float32)
        for _ in range(2):
            session.run(None, {"image": x})
    else:
        model = create_model(spec["method"], spec["size"], c, spec["num_classes"], h)
        x = torch.rand(batch, c, h, w)
        if mode == "train":
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            y = torch.randint(0, spec["num_classes"], (batch,))
            for _ in range(2):  # the second step holds the momentum buffers too
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
        else:
            model.eval()
            with torch.no_grad():
                for _ in range(2):
                    model(x)
    peak = peak_rss_bytes()
    return dict(
        baseline_mb=baseline / 2**20, peak_mb=peak / 2**20, delta_mb=max(peak - baseline, 0) / 2**20
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m bench.memprobe '<json spec>'")
    sys.stdout.write(json.dumps(probe(json.loads(args[0]))) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
