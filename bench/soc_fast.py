"""Fast SOC gradients vs autograd: training step time of SOC layers and networks.

``python -m bench.soc_fast [--sizes xxs,xs] [--batch 64] [--repeats 7] [--device cpu] [--out DIR]``

For one SOC layer and for whole SOC LipNets, the median time of a training step (forward +
backward + SGD step) with ``fast_grad`` off (autograd through the Horner loop), ``"exact"`` and
``"paper"`` (:mod:`models.soc_fast`), each as a ratio to autograd. The modes run interleaved
(autograd, exact, paper, autograd, …) so that load from other processes hits them alike. Also per
mode: the bytes autograd keeps for the backward (unique storages saved during one training
forward; deterministic, the memory that grows with depth and batch), the CUDA peak memory of a
step (on ``--device cuda``), and the gradient of all parameters compared with autograd's on the
same weights and batch (relative error and cosine). Results: a markdown table on stdout and
``soc_fast.json`` (with the machine description) in ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.machine import describe_machine
from bench.timing import synchronize
from training.tables import render_markdown

logger = logging.getLogger(__name__)

#: The compared backwards: the ``fast_grad`` value of every SOC layer, and its name in results.
MODES: tuple[tuple[Any, str], ...] = ((False, "autograd"), ("exact", "exact"), ("paper", "paper"))


def set_fast_grad(model: nn.Module, fast_grad: bool | str) -> int:
    """Set ``fast_grad`` on every SOC layer of ``model``; returns how many there are."""
    from models.layers.soc import SOCConv2d

    layers = [m for m in model.modules() if isinstance(m, SOCConv2d)]
    for m in layers:
        m.fast_grad = fast_grad
    return len(layers)


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean()


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for the backward of one training forward.

    Runs on a copy: a training forward updates SOC's power-iteration buffers.
    """
    model = copy.deepcopy(model)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(model, x)
    return sum(seen.values())


def _gradient(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """All parameter gradients of one training step, flattened (on a copy: buffers untouched)."""
    m = copy.deepcopy(model)
    m.zero_grad(set_to_none=True)
    _loss(m, x).backward()
    return torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]).double()


def measure(
    name: str, model: nn.Module, x: torch.Tensor, *, repeats: int, warmup: int, device: str
) -> dict[str, Any]:
    """Step time (median), saved bytes, CUDA peak and gradient error of every mode for one model.

    Args:
        name: row label.
        model: the model (not modified: every mode runs on its own copy).
        x: one batch.
        repeats: timed steps per mode (median).
        warmup: untimed steps per mode first.
        device: ``"cpu"`` or ``"cuda"``.

    Returns:
        One result row: ``<mode>_ms``, ``<mode>_ratio``, ``<mode>_saved_mb``, ``<mode>_peak_mb``
        (None on CPU) for every mode, and ``<mode>_grad_rel_err`` / ``<mode>_grad_cos`` for the
        fast modes.
    """
    x = x.to(device)
    models: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    for fast_grad, key in MODES:
        m = copy.deepcopy(model).to(device).train()
        set_fast_grad(m, fast_grad)
        models[key] = (m, torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9))
    row: dict[str, Any] = dict(name=name, batch=int(x.shape[0]), input=list(x.shape[1:]))
    # Gradients and saved bytes first, on the identical initial weights.
    ref = _gradient(models["autograd"][0], x)
    for _, key in MODES:
        m = models[key][0]
        row[f"{key}_saved_mb"] = saved_bytes(m, x) / 2**20
        if key != "autograd":
            got = _gradient(m, x)
            row[f"{key}_grad_rel_err"] = float((got - ref).norm() / ref.norm())
            row[f"{key}_grad_cos"] = float(torch.nn.functional.cosine_similarity(got, ref, dim=0))

    def step(key: str) -> float:
        m, opt = models[key]
        synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _loss(m, x).backward()
        opt.step()
        synchronize(device)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {key: [] for _, key in MODES}
    for i in range(warmup + repeats):
        for _, key in MODES:  # interleaved: noise from other processes hits every mode alike
            t = step(key)
            if i >= warmup:
                times[key].append(t)
    base = statistics.median(times["autograd"])
    for _, key in MODES:
        med = statistics.median(times[key])
        row[f"{key}_ms"] = 1e3 * med
        row[f"{key}_ratio"] = med / base
        row[f"{key}_peak_mb"] = None
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step(key)
            row[f"{key}_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def run(
    sizes: list[str],
    *,
    batch: int = 64,
    repeats: int = 7,
    warmup: int = 1,
    device: str = "cpu",
    layer_channels: int = 64,
    layer_pixels: int = 16,
    train_terms: int = 6,
    seed: int = 0,
) -> dict[str, Any]:
    """One SOC layer (3×3) and a LipNet SOC per size (3×32×32 input, 10 classes), every mode.

    Args:
        sizes: LipNet sizes (``models.list_sizes()``); empty for the layer only.
        batch: batch size of every step.
        repeats: timed steps per mode.
        warmup: untimed steps per mode.
        device: ``"cpu"`` or ``"cuda"``.
        layer_channels: channels of the single layer.
        layer_pixels: its map side.
        train_terms: Taylor terms ``T`` in training for every SOC layer.
        seed: weights and data.

    Returns:
        ``dict(machine, device, repeats, warmup, threads, train_terms, rows)``.
    """
    from models.layers.soc import SOCConv2d
    from models.registry import create_model

    torch.manual_seed(seed)
    layer = SOCConv2d(layer_channels, 3, train_terms=train_terms)
    rows = [
        measure(
            f"SOC layer c={layer_channels} {layer_pixels}x{layer_pixels}",
            layer,
            torch.randn(batch, layer_channels, layer_pixels, layer_pixels),
            repeats=repeats,
            warmup=warmup,
            device=device,
        )
    ]
    for size in sizes:
        logger.info("LipNet soc %s", size)
        model = create_model("soc", size, 3, 10, 32, layer_options={"train_terms": train_terms})
        rows.append(
            measure(
                f"LipNet soc {size}",
                model,
                torch.rand(batch, 3, 32, 32),
                repeats=repeats,
                warmup=warmup,
                device=device,
            )
        )
    return dict(
        machine=describe_machine(device),
        device=device,
        repeats=repeats,
        warmup=warmup,
        threads=torch.get_num_threads(),
        train_terms=train_terms,
        rows=rows,
    )


def markdown(result: dict[str, Any]) -> str:
    """The result rows as a markdown table (times in ms, ratios to autograd, saved MB)."""
    header = (
        "model",
        "batch",
        "autograd ms",
        "exact ms",
        "exact ÷ autograd",
        "paper ms",
        "paper ÷ autograd",
        "saved MB autograd / exact / paper",
        "exact grad rel. err",
        "paper grad rel. err (cos)",
    )
    rows = [
        [
            r["name"], r["batch"], f"{r['autograd_ms']:.1f}", f"{r['exact_ms']:.1f}",
            f"{r['exact_ratio']:.2f}", f"{r['paper_ms']:.1f}", f"{r['paper_ratio']:.2f}",
            f"{r['autograd_saved_mb']:.0f} / {r['exact_saved_mb']:.0f} / "
            f"{r['paper_saved_mb']:.0f}",
            f"{r['exact_grad_rel_err']:.1e}",
            f"{r['paper_grad_rel_err']:.1e} ({r['paper_grad_cos']:.4f})",
        ]
        for r in result["rows"]
    ]
    return render_markdown(header, rows)


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    p = argparse.ArgumentParser(
        prog="python -m bench.soc_fast", description=__doc__.splitlines()[0]
    )
    p.add_argument("--sizes", default="xxs,xs", help="LipNet sizes, comma list ('' for none)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7, help="timed steps per mode (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--layer-channels", type=int, default=64)
    p.add_argument("--layer-pixels", type=int, default=16)
    p.add_argument("--train-terms", type=int, default=6, help="Taylor terms T in training")
    p.add_argument(
        "--out", type=Path, default=Path("bench_results/soc_fast"), help="folder of soc_fast.json"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from models import list_sizes

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in list_sizes()]
    if bad:
        print(
            f"error: unknown size(s) {', '.join(bad)}; choose from {', '.join(list_sizes())}",
            file=sys.stderr,
        )
        return 2
    for name in ("batch", "repeats", "layer_channels", "layer_pixels", "train_terms"):
        if getattr(args, name) < 1:
            print(
                f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}",
                file=sys.stderr,
            )
            return 2
    if args.warmup < 0:
        print(f"error: --warmup must be >= 0, got {args.warmup}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    result = run(
        sizes,
        batch=args.batch,
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
        layer_channels=args.layer_channels,
        layer_pixels=args.layer_pixels,
        train_terms=args.train_terms,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soc_fast.json").write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
