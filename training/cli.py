"""Command line of ``python -m training`` (mapped onto :class:`training.config.TrainConfig`).

Examples::

    python -m training --method aol --size xs --dataset fashion-mnist --budget 5m
    python -m training --method all --size xxs --dataset digits --budget 30s     # a sweep
    python -m training --resume runs/fashion-mnist/aol-xs-20250101-120000 --budget 10m
    torchrun --nproc_per_node 2 -m training --method sll --dataset cifar10 --data-dir d --epochs 9

Bad arguments print one line naming the allowed values and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch.distributed

from data import DATASETS, DatasetUnavailableError, load_dataset
from models import list_sizes
from training.checkpoint import load_checkpoint
from training.config import (
    CUDA_BATCH_SIZE,
    DEFAULT_BUDGET_S,
    FALLBACK_DEFAULTS,
    METHOD_DEFAULTS,
    TrainConfig,
    parse_duration,
    parse_methods,
)
from training.distributed import setup_distributed
from training.loop import DivergenceError, train
from training.presets import apply_preset
from training.sweep import comparison_markdown, write_comparison

PROG = "python -m training"
#: The defaults shown in ``--help``: :class:`TrainConfig`'s own (one place for every default).
_DEFAULT = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _batch_help() -> str:
    """``--batch-size``'s help, from the per-method table."""
    base = FALLBACK_DEFAULTS.cpu_batch_size
    by_size: dict[int, list[str]] = {}
    for method, row in METHOD_DEFAULTS.items():
        if row.cpu_batch_size != base:
            by_size.setdefault(row.cpu_batch_size, []).append(method)
    others = "".join(f", {n} for {' and '.join(ms)}" for n, ms in sorted(by_size.items()))
    return f"global batch size (default {CUDA_BATCH_SIZE} on CUDA; on CPU {base}{others})"


class UsageError(Exception):
    """A bad command-line value (reported on one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Train, evaluate, export and store 1-Lipschitz classifiers.")
    p.add_argument("--method", help="method, comma list, or 'all' (a sweep)")
    p.add_argument(
        "--size",
        help=f"one of {', '.join(list_sizes())} (default: the preset of the method, device, "
        f"dataset and budget, see training/presets.py; else {_DEFAULT['size']})",
    )
    p.add_argument(
        "--no-preset",
        action="store_true",
        help="no preset: the paper's size and the per-method defaults unless flags say otherwise",
    )
    p.add_argument(
        "--dataset", help=f"one of {', '.join(DATASETS)} (default {_DEFAULT['dataset']})"
    )
    when = p.add_mutually_exclusive_group()
    when.add_argument(
        "--budget",
        help=f"wall-clock training budget per run: 90s, 5m, 1h (default {DEFAULT_BUDGET_S:g}s)",
    )
    when.add_argument("--epochs", type=int, help="train for N epochs instead of a budget")
    p.add_argument("--batch-size", type=int, help=_batch_help())
    p.add_argument("--lr", type=float, help="peak learning rate (default: per method)")
    p.add_argument("--weight-decay", type=float, help="weight decay (default: per method)")
    p.add_argument(
        "--eps-train",
        type=float,
        help=f"ε of the loss offset, [0,1] units (default {_DEFAULT['eps_train']:.4g})",
    )
    p.add_argument(
        "--temperature", type=float, help=f"loss temperature T (default {_DEFAULT['temperature']})"
    )
    p.add_argument("--seed", type=int, help=f"random seed (default {_DEFAULT['seed']})")
    p.add_argument("--device", help=f"auto, cpu or cuda (default {_DEFAULT['device']})")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--eval-every", help="evaluate every N epochs (N) or training time (30s, 2m)")
    p.add_argument(
        "--checkpoint-every",
        help=f"checkpoint interval in training time (default {_DEFAULT['checkpoint_every_s']:g}s)",
    )
    p.add_argument("--out", help=f"parent folder of the runs (default {_DEFAULT['out']}/)")
    p.add_argument("--data-dir", help="dataset folder (see docs/training.md)")
    p.add_argument("--no-store", action="store_true", help="do not save to the BentoML model store")
    p.add_argument(
        "--no-export",
        action="store_true",
        help="no ONNX file (and no store); final evaluation in torch, audited",
    )
    p.add_argument("--head", help="linear, lln or crc (Singla & Feizi heads; default linear)")
    p.add_argument("--activation", help="maxmin or hh (Householder; default maxmin)")
    p.add_argument("--pool", help="none or distance (1-Lipschitz pool in the last block)")
    p.add_argument(
        "--curvature-weight", type=float, help="CRC-Lip curvature regularizer weight (default 0)"
    )
    p.add_argument(
        "--ema", type=float, metavar="DECAY",
        help="evaluate and export an EMA of the weights with this per-step decay (e.g. 0.999)",
    )
    p.add_argument(
        "--layer-option", action="append", metavar="KEY=VALUE",
        help="extra option of every conv layer, e.g. fast_grad=exact for SOC (repeatable)",
    )
    p.add_argument("--resume", help="continue a run folder or checkpoint.pt (same folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default="INFO", help="logging level of lipcert (default INFO)")
    return p


def _eval_every(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    if text.strip().isdigit():
        if int(text) < 1:
            raise UsageError(
                f"bad --eval-every {text!r}; use N >= 1 epochs or a duration (30s, 2m)"
            )
        return dict(eval_every=int(text), eval_every_s=None)
    return dict(eval_every=None, eval_every_s=parse_duration(text, "--eval-every"))


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config fields set explicitly on the command line."""
    given: dict[str, Any] = {}
    for name in (
        "size",
        "dataset",
        "batch_size",
        "lr",
        "weight_decay",
        "eps_train",
        "temperature",
        "seed",
        "device",
        "out",
        "data_dir",
    ):
        value = getattr(args, name)
        if value is not None:
            given[name] = value
    if args.budget is not None:
        given.update(budget_s=parse_duration(args.budget), epochs=None)
    if args.epochs is not None:
        given.update(epochs=args.epochs, budget_s=None)
    if args.checkpoint_every is not None:
        given["checkpoint_every_s"] = parse_duration(args.checkpoint_every, "--checkpoint-every")
    if args.no_amp:
        given["amp"] = False
    if args.no_store:
        given["store"] = False
    if args.no_export:
        given["export"] = False
    given.update(_eval_every(args.eval_every))
    for name in ("head", "activation"):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name).strip().lower()
    if args.pool is not None:
        given["pool"] = None if args.pool.strip().lower() == "none" else args.pool.strip().lower()
    if args.curvature_weight is not None:
        given["curvature_weight"] = args.curvature_weight
    if args.ema is not None:
        given["ema_decay"] = args.ema
    if args.layer_option:
        given["layer_options"] = _layer_options(args.layer_option)
    return given


def _layer_options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings → a dict; values parsed as JSON where they are (1, 0.5, true)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UsageError(f"bad --layer-option {item!r}; use KEY=VALUE, e.g. fast_grad=exact")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _device_type(name: str) -> str:
    """``cpu`` or ``cuda``: what ``--device`` (``auto`` included) will train on."""
    name = str(name).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def configs_from_args(args: argparse.Namespace) -> list[TrainConfig]:
    """The runs the arguments ask for (one per method; one from the checkpoint with --resume).

    Raises:
        UsageError: any bad value (method, size, dataset, budget …), naming the allowed ones.
    """
    try:
        given = _overrides(args)
        if args.resume is not None:
            if args.method is not None:
                raise UsageError("--resume continues the checkpoint's method; drop --method")
            base = load_checkpoint(args.resume)["config"]
            return [TrainConfig.from_dict({**base, **given})]
        if args.method is None:
            raise UsageError("--method is required (a method, a comma list or 'all')")
        if "budget_s" not in given and "epochs" not in given:
            given["budget_s"] = DEFAULT_BUDGET_S
        methods = parse_methods(args.method)
        if args.no_preset:
            return [TrainConfig(method=m, **given) for m in methods]
        device = _device_type(given.get("device", _DEFAULT["device"]))
        dataset = given.get("dataset", _DEFAULT["dataset"])
        return [TrainConfig(method=m, **apply_preset(given, m, device, dataset)) for m in methods]
    except UsageError:
        raise
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None


class _Progress:
    """A tqdm bar over the budget (seconds) or the steps, with loss, acc and img/s."""

    def __init__(self, cfg: TrainConfig, label: str) -> None:
        from tqdm import tqdm  # only when a bar is shown

        budget = cfg.budget_s is not None
        self.budget = budget
        self.bar = tqdm(
            total=round(cfg.budget_s, 1) if budget else None,
            desc=label,
            unit="s" if budget else "step",
            dynamic_ncols=True,
            leave=True,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f}s "
            "[{elapsed}<{remaining}{postfix}]"
            if budget
            else None,
        )

    def __call__(self, record: dict[str, Any]) -> None:
        if self.bar.total is None and record.get("total_steps"):
            self.bar.total = record["total_steps"]
        self.bar.n = (
            round(min(record["elapsed_s"], self.bar.total or 1e18), 1)
            if self.budget
            else record["step"]
        )
        self.bar.set_postfix(
            loss=f"{record['loss']:.3f}",
            acc=f"{record['acc']:.3f}",
            img_s=f"{record['images_per_s']:.0f}",
            epoch=f"{record['epoch']:.1f}",
            refresh=False,
        )
        self.bar.refresh()

    def finish(self, report: dict[str, Any]) -> None:
        """Show the finished run (the last update may be up to ``guard_every`` steps old)."""
        # Clamp: tqdm drops ``total`` (and our bar format with it) once n passes total + 0.5.
        if self.budget:
            self.bar.n = round(min(report["train_time_s"], self.bar.total), 1)
        else:
            self.bar.n = report["steps"]
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _summary(report: dict[str, Any]) -> str:
    cra = ", ".join(f"{k}: {100 * v:.1f}%" for k, v in report["certified_accuracy"].items())
    where = report["onnx"] or report["run_dir"]
    return (
        f"{report['method']} {report['size']} {report['dataset']}: clean "
        f"{100 * report['clean_accuracy']:.1f}%, certified {cra}; bound "
        f"{report['lipschitz_bound']:.4f} ({report['certificate']}); "
        f"{report['train_time_s']:.1f} s, {report['epochs']:.2f} epochs -> {where}"
        + (f" [{report['store_tag']}]" if report.get("store_tag") else "")
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configs = configs_from_args(args)
    except UsageError as exc:
        parser.exit(2, f"{PROG}: error: {exc}\n")
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        parser.exit(
            2,
            f"{PROG}: error: bad --log-level {args.log_level!r}; choose from DEBUG, "
            "INFO, WARNING, ERROR\n",
        )
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in ("training", "models", "certify"):
        logging.getLogger(name).setLevel(level)

    # One process group for all runs of a sweep (torchrun's store is not re-initialized per run).
    dist_ctx, _ = setup_distributed(configs[0].device)
    try:
        return _run(args, configs, main_rank=dist_ctx.main)
    finally:
        if dist_ctx.active:
            torch.distributed.destroy_process_group()


def _run(args: argparse.Namespace, configs: list[TrainConfig], *, main_rank: bool) -> int:
    """Train every config in turn; print summaries and, for a sweep, the comparison table."""
    try:
        data = load_dataset(configs[0].dataset, configs[0].data_dir)
    except DatasetUnavailableError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    reports: list[dict[str, Any]] = []
    failed = False
    for cfg in configs:
        bar = (
            _Progress(cfg, f"{cfg.method}-{cfg.size}")
            if main_rank and not args.no_progress
            else None
        )
        try:
            result = train(cfg, resume=args.resume, progress=bar, data=data)
            if bar is not None:
                bar.finish(result.report)
        except DivergenceError as exc:
            failed = True
            logging.getLogger("training").error("%s failed: %s", cfg.method, exc)
            reports.append(
                dict(method=cfg.method, size=cfg.size, dataset=cfg.dataset, error=str(exc))
            )
            continue
        finally:
            if bar is not None:
                bar.close()
        if main_rank:
            reports.append(result.report)
            print(_summary(result.report), flush=True)
    if main_rank and len(configs) > 1:
        cfg = configs[0]
        stem = (
            Path(cfg.out) / cfg.dataset / f"comparison-{cfg.size}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        md, csv_path = write_comparison(reports, stem)
        print(comparison_markdown(reports), end="")
        print(f"comparison: {md} {csv_path}", flush=True)
    return 1 if failed else 0


__all__ = ["UsageError", "build_parser", "configs_from_args", "main"]
