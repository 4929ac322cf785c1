"""Which real-valued form should the FFT layers (Cayley, LOT) export to? Measured in ONNX Runtime.

Forms of the same circular convolution with a dense per-frequency spectrum on ``n × n``:

- ``spatial``: :class:`models.plain.CircularConv2d` with the full ``n × n`` (``n+1`` for even n)
  kernel, the inverse DFT of the spectrum — one Conv op, ``O(n⁴ c²)`` per image.
- ``fourier``: :class:`models.plain.FourierConv2d` — DFTs as real matmuls and one ``2c × 2c``
  block per frequency, ``O(n³ c + n² c²)`` per image.
- ``conv3x3 (reference)``: a 3×3 circular convolution (a different operator), for scale.

Run: ``OMP_NUM_THREADS=1 python -m bench.fourier_forms [--threads 1] [--repeats 20]``.
Prints a markdown table (median ms per batch, and the max deviation from the eager FFT layer).
``--train`` prints instead the eager forward+backward time of one layer per method (16 channels,
32×32, batch 64, k = 3) and its ratio to AOL.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from models.layers.cayley import CayleyConv2d
from models.ops import apply_spectrum, spectrum_to_circular_kernel
from models.plain import CircularConv2d, FourierConv2d

CASES = [(16, 32, 1), (16, 32, 64), (64, 8, 1), (64, 8, 64)]  # (channels, n, batch)


def _forms(channels: int, n: int) -> tuple[nn.Module, dict[str, nn.Module]]:
    layer = CayleyConv2d(channels, 3).eval()
    with torch.no_grad():
        q = layer.spectrum(n, layer.weight.double())
    bias = layer.bias
    forms = {
        "spatial": CircularConv2d(spectrum_to_circular_kernel(q, n), bias),
        "fourier": FourierConv2d(q, bias),
        # Not the same operator: a 3×3 circular conv (AOL, BCOP at inference), for scale.
        "conv3x3 (reference)": CircularConv2d(torch.randn(channels, channels, 3, 3) / 9, bias),
    }
    return layer, forms


def _ort_session(module: nn.Module, x: torch.Tensor, path: Path, threads: int):
    from certify.artifact import open_session

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (x,), str(path), input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=19, dynamo=False,
        )
    return open_session(path, ["CPUExecutionProvider"], threads)


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: graph optimization, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--train", action="store_true", help="time forward+backward per method")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.train:
        _train_table(args.repeats)
        return
    print("| c | n | batch | form | ORT ms/batch | max abs err vs eager FFT |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for channels, n, batch in CASES:
            layer, forms = _forms(channels, n)
            x = torch.randn(batch, channels, n, n)
            with torch.no_grad():
                q = layer.spectrum(n, layer.weight.double())
                ref = (
                    apply_spectrum(x.double(), q) + layer.bias.double().view(1, -1, 1, 1)
                ).float()
            for name, module in forms.items():
                sess = _ort_session(
                    module, x[:2], Path(tmp) / f"form{len(name)}.onnx", args.threads
                )
                feed = {"x": x.numpy()}
                out = torch.from_numpy(sess.run(None, feed)[0])
                err = (out - ref).abs().max().item() if "reference" not in name else float("nan")
                ms = _median_ms(lambda: sess.run(None, feed), args.repeats)  # noqa: B023
                print(f"| {channels} | {n} | {batch} | {name} | {ms:.3f} | {err:.1e} |")


def _train_table(repeats: int, methods: tuple[str, ...] = ("aol", "bcop", "cayley", "lot")) -> None:
    from models import create_layer

    x = torch.randn(64, 16, 32, 32)
    times = {}
    for method in methods:
        layer = create_layer(method, 16, 3).train()

        def step(layer: nn.Module = layer) -> None:
            layer.zero_grad(set_to_none=True)
            layer(x).square().mean().backward()

        times[method] = _median_ms(step, repeats)
    print("| method | fwd+bwd ms (c=16, 32×32, batch 64) | × AOL |")
    print("|---|---|---|")
    for method, ms in times.items():
        print(f"| {method} | {ms:.1f} | {ms / times['aol']:.2f} |")


if __name__ == "__main__":
    main()
