"""Fast SOC gradients vs autograd: training step time of SOC layers and networks.

``python -m bench.soc_fast [--sizes xxs,xs] [--batch 64] [--repeats 5] [--device cpu] [--out DIR]``

For one SOC layer and for whole SOC LipNets, the median time of a training step (forward +
backward + SGD step) with ``fast_grad`` off (autograd through the Horner loop), ``"exact"`` and
``"paper"`` (:mod:`models.soc_fast`), interleaved so machine noise hits every mode alike, each
as a ratio to autograd. Also the largest gradient difference of each mode to autograd, on the
same weights and batch. Results: a markdown table on stdout and ``soc_fast.json`` (with the
machine description) in ``--out``.
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

logger = logging.getLogger(__name__)
MODES: tuple[Any, ...] = (False, "exact", "paper")


def _set_mode(model: nn.Module, mode: Any) -> None:
    from models.layers.soc import SOCConv2d
    from models.soc_fast import resolve_grad_mode

    for m in model.modules():
        if isinstance(m, SOCConv2d):
            m.fast_grad, m.grad_mode = mode, resolve_grad_mode(mode)


def _grads(model: nn.Module, x: torch.Tensor, mode: Any) -> list[torch.Tensor]:
    m = copy.deepcopy(model)
    _set_mode(m, mode)
    m.train()
    m(x).square().sum().backward()
    return [p.grad.detach().clone() for p in m.parameters() if p.grad is not None]


def measure(
    name: str, model: nn.Module, x: torch.Tensor, *, repeats: int, warmup: int, device: str
) -> dict[str, Any]:
    """Step times of one model in every mode (interleaved), ratios and gradient differences."""
    model = model.to(device)
    x = x.to(device)
    models = {}
    for mode in MODES:
        m = copy.deepcopy(model)
        _set_mode(m, mode)
        m.train()
        models[mode] = (m, torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9))

    def step(mode: Any) -> float:
        m, opt = models[mode]
        synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        m(x).square().mean().backward()
        opt.step()
        synchronize(device)
        return time.perf_counter() - t0

    times: dict[Any, list[float]] = {mode: [] for mode in MODES}
    for i in range(warmup + repeats):
        for mode in MODES:  # interleaved: noise hits all modes alike
            t = step(mode)
            if i >= warmup:
                times[mode].append(t)
    ref = _grads(model, x, False)
    row: dict[str, Any] = dict(name=name, batch=int(x.shape[0]), input=list(x.shape[1:]))
    base = statistics.median(times[False])
    for mode in MODES:
        key = "autograd" if mode is False else mode
        med = statistics.median(times[mode])
        row[f"{key}_ms"] = 1e3 * med
        row[f"{key}_ratio"] = med / base
        if mode is not False:
            got = _grads(model, x, mode)
            row[f"{key}_max_grad_rel_diff"] = max(
                float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(got, ref, strict=True)
            )
    return row


def run(sizes: list[str], batch: int, repeats: int, warmup: int, device: str,
        layer_channels: int = 64, layer_pixels: int = 16) -> dict[str, Any]:
    """All measurements: one SOC layer, then a LipNet SOC per size (3×32×32, 10 classes)."""
    from models.layers.soc import SOCConv2d
    from models.registry import create_model

    torch.manual_seed(0)
    rows = [
        measure(
            f"SOC layer c={layer_channels} {layer_pixels}x{layer_pixels}",
            SOCConv2d(layer_channels, 3),
            torch.randn(batch, layer_channels, layer_pixels, layer_pixels),
            repeats=repeats, warmup=warmup, device=device,
        )
    ]
    for size in sizes:
        rows.append(
            measure(f"LipNet soc {size}", create_model("soc", size, 3, 10, 32),
                    torch.rand(batch, 3, 32, 32), repeats=repeats, warmup=warmup, device=device)
        )
    return dict(machine=describe_machine(device), device=device, repeats=repeats, warmup=warmup,
                threads=torch.get_num_threads(), rows=rows)


def markdown(result: dict[str, Any]) -> str:
    header = ("model", "batch", "autograd ms", "exact ms", "exact ÷ autograd", "paper ms",
              "paper ÷ autograd", "exact grad rel. diff", "paper grad rel. diff")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['batch']} | {r['autograd_ms']:.1f} | {r['exact_ms']:.1f} | "
            f"{r['exact_ratio']:.3f} | {r['paper_ms']:.1f} | {r['paper_ratio']:.3f} | "
            f"{r['exact_max_grad_rel_diff']:.1e} | {r['paper_max_grad_rel_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soc_fast", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="xxs,xs", help="LipNet sizes, comma list ('' for none)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--layer-channels", type=int, default=64)
    p.add_argument("--layer-pixels", type=int, default=16)
    p.add_argument("--out", default="bench-out", help="folder of soc_fast.json")
    args = p.parse_args(argv)
    from models import list_sizes

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in list_sizes()]
    if bad or args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        print(f"error: sizes {bad or sizes} (choose from {', '.join(list_sizes())}), batch "
              f"{args.batch}, repeats {args.repeats} (>= 1), warmup {args.warmup} (>= 0)",
              file=sys.stderr)
        return 2
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        print(f"error: device {args.device!r} is not available; choose cpu or cuda", file=sys.stderr)
        return 2
    result = run(sizes, args.batch, args.repeats, args.warmup, args.device,
                 args.layer_channels, args.layer_pixels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soc_fast.json").write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
