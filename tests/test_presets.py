"""Presets: ``python -m training`` without --size picks the measured preset for the method,
device, data set and budget; flags override it; uncovered runs get none."""

from __future__ import annotations

import pytest

from models import list_methods
from training.cli import build_parser, configs_from_args
from training.presets import PRESETS, find_preset


def _configs(*argv: str):
    return configs_from_args(build_parser().parse_args(list(argv)))


def test_cpu_fashion_mnist_10m_picks_the_preset_for_every_method() -> None:
    configs = _configs(
        "--method", "all", "--dataset", "fashion-mnist", "--budget", "10m", "--device", "cpu"
    )
    assert [c.method for c in configs] == list_methods()
    for cfg in configs:
        row = find_preset(cfg.method, "fashion-mnist", "cpu", 600.0)
        assert row is not None and cfg.preset == row.name
        assert cfg.size == row.values(cfg.method)["size"]


@pytest.mark.parametrize(
    "argv, size, preset",
    [
        (["--size", "s"], "s", None),  # the flag wins; nothing left for the preset to fill
        (["--no-preset"], "xs", None),
        (["--budget", "20m"], "xs", None),  # longer than any measured CPU budget
        (["--epochs", "2"], "xs", None),
        (["--dataset", "digits"], "xs", None),  # a data set no preset was measured on
    ],
)
def test_flags_and_uncovered_runs(argv: list[str], size: str, preset: str | None) -> None:
    base = {"--budget": "10m", "--dataset": "fashion-mnist"}
    args = ["--method", "aol", "--device", "cpu"]
    for flag, value in base.items():
        if flag not in argv and not (flag == "--budget" and "--epochs" in argv):
            args += [flag, value]
    (cfg,) = _configs(*args, *argv)
    assert (cfg.size, cfg.preset) == (size, preset)


def test_a_flag_overrides_only_its_own_field() -> None:
    (cfg,) = _configs(
        "--method", "sll", "--dataset", "fashion-mnist", "--budget", "3m", "--device", "cpu",
        "--lr", "0.01",
    )
    assert cfg.lr == 0.01 and cfg.size == find_preset("sll", "fashion-mnist", "cpu", 180.0).values(
        "sll"
    )["size"]


def test_gpu_rows_differ_from_cpu_rows_and_every_row_names_its_evidence() -> None:
    cpu = find_preset("aol", "fashion-mnist", "cpu", 180.0)
    gpu = find_preset("aol", "fashion-mnist", "cuda", 180.0)
    assert cpu is not None and gpu is not None and cpu.name != gpu.name
    for row in PRESETS:
        assert row.evidence and set(row.methods) <= set(list_methods())
        assert set(row.by_method) <= set(row.methods)


def test_per_method_rows_fill_only_their_methods() -> None:
    configs = {
        c.method: c
        for c in _configs(
            "--method", "all", "--dataset", "fashion-mnist", "--budget", "3m", "--device", "cpu"
        )
    }
    assert configs["cpl"].head == configs["sll"].head == "lln"
    assert configs["aol"].head == configs["lot"].head == "linear"
    assert configs["lot"].lr == 4e-2 and configs["aol"].lr is None
    (flagged,) = _configs(
        "--method", "sll", "--dataset", "fashion-mnist", "--budget", "3m", "--device", "cpu",
        "--head", "linear",
    )
    assert flagged.head == "linear" and flagged.preset is not None  # the size still came from it
