"""Which real-valued form should the FFT layers (Cayley, LOT, BRO, Sandwich) export to? Measured in
ONNX Runtime, one layer at a time, all forms side by side in one run.

Forms of the same circular convolution (a dense per-frequency spectrum on ``N × N``,
``N = n + 2·pad``: LOT and BRO zero-pad by 1 and crop back, Cayley and Sandwich do not):

- ``frequency-major``: :class:`models.plain.FourierConv2d` as exported now — two 2-D transposes,
  five GEMMs (small constant DFT matrices on the left), one batched MatMul for the blocks.
- ``dense DFT (before)``: the previous export form (:class:`DenseDftConv2d` below): the DFTs as
  right-multiplications by constant matrices with 5-D transposes in between, real ``2c × 2c``
  blocks, padding and crop as separate ops.
- ``ONNX DFT op (transforms only)``: the four ``DFT`` operators (opset 17+) of an rFFT2 and its
  inverse, *without* the per-frequency products or any transpose: a lower bound of any form
  built on ONNX's DFT. Its error column is the round trip's.
- ``spatial``: :class:`models.plain.CircularConv2d` with the full ``N × N`` kernel (one Conv,
  ``O(N⁴ c²)`` per image; only with ``--spatial``, it takes minutes at batch 256).
- ``conv3x3 (reference)``: a 3×3 circular convolution, what AOL, BCOP and Standard export (a
  different operator), for scale.

Run: ``OMP_NUM_THREADS=1 python -m bench.fourier_forms [--threads 1] [--repeats 5]``. Prints a
markdown table (median ms per batch, ÷ conv3x3 of the same shape, max deviation from the eager
float64 FFT). ``--train`` prints instead the eager forward+backward time of one layer per method
(16 channels, 32×32, batch 64, k = 3) and its ratio to AOL.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.ops import apply_spectrum, circular_conv_spectrum, spectrum_to_circular_kernel
from models.plain import CircularConv2d, FourierConv2d

#: (channels, n, pad): the shapes of LipNet size S's 3×3 layers (Cayley pad 0, LOT pad 1).
SHAPES = [(32, 32, 0), (64, 16, 0), (128, 8, 0), (256, 4, 0), (32, 32, 1), (256, 4, 1)]


class DenseDftConv2d(nn.Module):
    """The previous export form of :class:`models.plain.FourierConv2d`, kept for comparison.

    Rows: ``x @ dft_w`` (one-sided real DFT, ``(N, 2r)``); columns: ``[Re | Im] @ dft_h`` (the
    unitary DFT as a ``2N × 2N`` real matrix); one real ``2c × 2c`` block per frequency; the
    inverse by the transposed matrices, 5-D transposes in between, padding and crop as ops.
    """

    def __init__(self, spectrum: torch.Tensor, bias: torch.Tensor | None, pad: int = 0) -> None:
        super().__init__()
        size, half, c, _ = spectrum.shape
        self.pad, self.size = pad, size
        q = spectrum.to(torch.complex128)
        real = torch.cat(
            [torch.cat([q.real, -q.imag], dim=-1), torch.cat([q.imag, q.real], dim=-1)], dim=-2
        )  # (N, r, 2c, 2c)
        blocks = real.transpose(0, 1).reshape(size * half, 2 * c, 2 * c).transpose(-1, -2)
        t = torch.arange(size, dtype=torch.float64)
        angle = 2 * torch.pi * torch.outer(t, t[:half]) / size
        weight = torch.full((half,), 2.0, dtype=torch.float64)
        weight[0] = 1.0
        if size % 2 == 0:
            weight[-1] = 1.0
        sin = torch.sin(angle) * (weight != 1.0)  # exact zeros at self-conjugate bins
        scale = (weight / size).sqrt()
        dft_w = torch.cat([torch.cos(angle) * scale, -sin * scale], dim=1)
        angle = 2 * torch.pi * torch.outer(t, t) / size
        cos, sin = torch.cos(angle) / size**0.5, torch.sin(angle) / size**0.5
        dft_h = torch.cat([torch.cat([cos, -sin], dim=1), torch.cat([sin, cos], dim=1)], dim=0)
        self.register_buffer("dft_w", dft_w.float())
        self.register_buffer("dft_h", dft_h.float())
        self.register_buffer("blocks", blocks.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, n, r = self.pad, self.size, self.size // 2 + 1
        if p:
            x = F.pad(x, (p, p, p, p))
        b, c = x.shape[0], x.shape[1]
        z = x @ self.dft_w
        z = z.reshape(b, c, n, 2, r).permute(0, 1, 4, 3, 2).reshape(b, c, r, 2 * n)
        z = z @ self.dft_h
        z = z.reshape(b, c, r, 2, n).permute(2, 4, 0, 3, 1).reshape(r * n, b, 2 * c)
        z = torch.matmul(z, self.blocks)
        z = z.reshape(r, n, b, 2, c).permute(2, 4, 0, 3, 1).reshape(b, c, r, 2 * n)
        z = z @ self.dft_h.transpose(0, 1)
        z = z.reshape(b, c, r, 2, n).permute(0, 1, 4, 3, 2).reshape(b, c, n, 2 * r)
        y = z @ self.dft_w.transpose(0, 1)
        if p:
            y = y[..., p:-p, p:-p]
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def _dft_op_model(size: int) -> bytes:
    """rFFT2 and its inverse as four ONNX ``DFT`` nodes on ``(B, C, N, N, 1)``; output real."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("DFT", ["x"], ["a"], axis=3, onesided=1),
        helper.make_node("DFT", ["a"], ["b"], axis=2),
        helper.make_node("DFT", ["b"], ["c"], axis=2, inverse=1),
        helper.make_node("DFT", ["c"], ["y"], axis=3, inverse=1, onesided=1),
    ]
    graph = helper.make_graph(
        nodes, "rfft2_roundtrip",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", None, size, size, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9  # what ONNX Runtime 1.2x reads
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _ort_session(module: nn.Module, x: torch.Tensor, path: Path, threads: int):
    from certify.artifact import open_session

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (x[:2],), str(path), input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=19, dynamo=False,
            do_constant_folding=False,
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


def _forms(
    channels: int, n: int, pad: int, spatial: bool
) -> tuple[torch.Tensor, torch.Tensor, dict[str, nn.Module]]:
    size = n + 2 * pad
    kernel = torch.randn(channels, channels, 3, 3, dtype=torch.float64) / (3 * channels**0.5)
    q = circular_conv_spectrum(kernel, size, onesided=True)  # a dense spectrum, not orthogonal
    bias = torch.randn(channels)
    forms: dict[str, nn.Module] = {
        "conv3x3 (reference)": CircularConv2d(torch.randn(channels, channels, 3, 3) / 9, bias),
        "dense DFT (before)": DenseDftConv2d(q, bias, pad),
        "frequency-major": FourierConv2d(q, bias, pad=pad),
    }
    if spatial and pad == 0:
        forms["spatial"] = CircularConv2d(spectrum_to_circular_kernel(q, size), bias)
    return q, bias, forms


def _rows(channels: int, n: int, pad: int, batch: int, args, tmp: Path) -> list[str]:
    from certify.artifact import open_session

    q, bias, forms = _forms(channels, n, pad, args.spatial)
    x = torch.randn(batch, channels, n, n)
    ref = apply_spectrum(F.pad(x.double(), (pad,) * 4), q)
    ref = ref[..., pad : pad + n, pad : pad + n] + bias.double().view(1, -1, 1, 1)
    feed, times, lines = {"x": x.numpy()}, {}, []
    for name, module in forms.items():
        sess = _ort_session(module.eval(), x, tmp / "form.onnx", args.threads)
        out = torch.from_numpy(sess.run(None, feed)[0]).double()
        err = (out - ref).abs().max().item() if "reference" not in name else float("nan")
        times[name] = _median_ms(lambda: sess.run(None, feed), args.repeats)  # noqa: B023
        lines.append((name, times[name], err))
    size = n + 2 * pad
    sess = open_session(_dft_op_model(size), ["CPUExecutionProvider"], args.threads)
    padded = F.pad(x, (pad,) * 4)[..., None].numpy()
    out = torch.from_numpy(sess.run(None, {"x": padded})[0]).reshape(padded.shape[:-1])
    err = (out.double() - torch.from_numpy(padded[..., 0]).double()).abs().max().item()
    ms = _median_ms(lambda: sess.run(None, {"x": padded}), args.repeats)
    lines.append(("ONNX DFT op (transforms only)", ms, err))
    base = times["conv3x3 (reference)"]
    return [
        f"| {channels} | {n} | {pad} | {batch} | {name} | {ms:.3f} | {ms / base:.2f} | "
        + ("–" if err != err else f"{err:.1e}") + " |"
        for name, ms, err in lines
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", default="1,256", help="comma list (default 1,256)")
    parser.add_argument("--spatial", action="store_true", help="also time the full-kernel conv")
    parser.add_argument("--train", action="store_true", help="time forward+backward per method")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.train:
        _train_table(args.repeats)
        return
    print("| c | n | pad | batch | form | ORT ms/batch | ÷ conv3x3 | max abs err vs eager FFT |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (int(b) for b in args.batches.split(",")):
            for channels, n, pad in SHAPES:
                for line in _rows(channels, n, pad, batch, args, Path(tmp)):
                    print(line, flush=True)


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
