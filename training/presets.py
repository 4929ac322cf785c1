"""Training presets: the size (and any other setting) a measured search chose for a method, a
device, a data set and a budget, so that ``python -m training --method M --dataset
fashion-mnist --budget 10m`` trains what trained best in the measurements without a hand-given
flag. Every flag given on the command line overrides its preset value; ``--no-preset`` turns
presets off (the paper's XS network and :data:`training.config.METHOD_DEFAULTS`).

One table, :data:`PRESETS`; each row names the measurement that chose it (``evidence``: the
command and the results file). A method, device, data set or budget no row covers gets no preset:
nothing is extrapolated to data sets or budgets that were not measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from models import list_methods

#: The ten Lipschitz methods and the unconstrained baseline (every registered method).
_ALL = tuple(list_methods())

_CPU_SIZE_SWEEPS = (
    "two 10-minute sweeps on the 2-core CPU, at size xs (the seven and Standard, "
    "docs/results/cpu_fashion_mnist_xs_10m.jsonl) and at xxs (all ten and Standard, "
    "docs/results/cpu_fashion_mnist_xxs_10m.jsonl): OMP_NUM_THREADS=2 python -m training "
    "--method all --size {xs,xxs} --dataset fashion-mnist --budget 10m --no-store. xxs won for "
    "every method run at both sizes (CRA@36/255 +2.9 to +7.1 points, 1.8-3.4x the epochs); "
    "AOC, BRO and Sandwich were run at xxs only. Shorter budgets: AOL xxs 3 min 75.4 % / 68.5 % "
    "against AOL xs 4 min 71.5 % / 62.1 % (training/config.py)"
)
_CPU_LEVERS = (
    "3-minute pairs on the 2-core CPU, two one-thread runs side by side, xxs, Fashion-MNIST "
    "(docs/training.md, 'Levers'; docs/results/cpu_fashion_mnist_levers.jsonl): "
    "OMP_NUM_THREADS=1 python -m training --method M --dataset fashion-mnist --budget 3m "
    "[--head lln | --lr 4e-2]. Clean % / CRA@36/255 %: SLL linear 75.4/63.8 (generic "
    "certificate), lln 78.6/70.4; CPL linear 77.5/67.3, lln 78.5/70.5; LOT lr 2e-2 74.8/65.5, "
    "4e-2 76.0/67.2; AOL linear 78.0/71.3, lln 78.2/71.3 (no gain where the method's own head "
    "already gives the linear-head certificate, so only CPL and SLL take lln)"
)
_GPU_SWEEP = (
    "the H100 3-minute sweep at size xs (README, docs/results/gpu_h100_fashion_mnist_xs_3m.jsonl): "
    "AOL xs 80.0 % clean / 73.3 % CRA@36/255 in 3 minutes against AOL xxs 79.3 / 72.4 in 2 "
    "minutes on the same GPU, where AOL xs made 8.35 epochs in 3 minutes (the 2-core CPU: 3.38 "
    "in 10)"
)


@dataclass(frozen=True)
class Preset:
    """One row of :data:`PRESETS`.

    Attributes:
        name: short tag saved in ``config.json`` and ``report.json`` (``preset``).
        device: ``"cpu"`` or ``"cuda"``.
        datasets: the data sets the measurement used.
        max_budget_s: the longest wall-clock budget the row covers (shorter ones too, down to
            ``min_budget_s``); budgets given as ``--epochs`` get no preset.
        methods: the methods the row applies to.
        settings: :class:`training.config.TrainConfig` fields the row sets (``size``,
            ``batch_size``, ``lr``, ``head`` …), per method where ``by_method`` has a row.
        by_method: per-method settings on top of ``settings``.
        evidence: how the row was chosen (commands and results files).
    """

    name: str
    device: str
    datasets: tuple[str, ...]
    max_budget_s: float
    methods: tuple[str, ...]
    settings: dict[str, Any]
    evidence: str
    min_budget_s: float = 0.0
    by_method: dict[str, dict[str, Any]] = field(default_factory=dict)

    def covers(self, method: str, dataset: str, device: str, budget_s: float | None) -> bool:
        return (
            budget_s is not None
            and math.isfinite(budget_s)
            and self.device == device
            and dataset in self.datasets
            and method in self.methods
            and self.min_budget_s < budget_s <= self.max_budget_s
        )

    def values(self, method: str) -> dict[str, Any]:
        """The config fields this row sets for ``method``."""
        return {**self.settings, **self.by_method.get(method, {})}


#: The presets, first match wins.
PRESETS: tuple[Preset, ...] = (
    Preset(
        name="cpu-fmnist-10m",
        device="cpu",
        datasets=("fashion-mnist",),
        max_budget_s=600.0,
        methods=_ALL,
        settings={"size": "xxs"},
        by_method={"cpl": {"head": "lln"}, "sll": {"head": "lln"}, "lot": {"lr": 4e-2}},
        evidence=f"{_CPU_SIZE_SWEEPS}; {_CPU_LEVERS}",
    ),
    Preset(
        name="cuda-fmnist-3m",
        device="cuda",
        datasets=("fashion-mnist",),
        max_budget_s=180.0,
        methods=_ALL,
        settings={"size": "xs"},
        evidence=_GPU_SWEEP,
    ),
)


def find_preset(method: str, dataset: str, device: str, budget_s: float | None) -> Preset | None:
    """The first row of :data:`PRESETS` that covers the run, or None."""
    for row in PRESETS:
        if row.covers(method, dataset, device, budget_s):
            return row
    return None


def apply_preset(
    given: dict[str, Any], method: str, device: str, dataset: str
) -> dict[str, Any]:
    """``given`` (the fields set on the command line) completed by the preset of the run.

    A field in ``given`` is never replaced. The result carries ``preset``: the row's name when
    it filled in at least one field, else None.
    """
    row = find_preset(method, dataset, device, given.get("budget_s"))
    filled = {} if row is None else {k: v for k, v in row.values(method).items() if k not in given}
    return {**filled, **given, "preset": row.name if filled else None}
