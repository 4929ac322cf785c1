"""Training configuration: one frozen dataclass, per-method defaults, budget parsing.

Units: learning rate per step (SGD), weight decay as SGD's L2 coefficient, ``eps_train`` and
radii in [0, 1]-pixel L2 units, budgets and times in seconds of wall clock.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from training.data import DATASETS

#: Peak one-cycle learning rate per method: the comparison paper's best CIFAR-10 XS values
#: (Prach et al., CVPR 2024, tables in the appendix). Standard is ours: plain cross-entropy
#: without any norm constraint diverged at 5e-2 on digits (with an orthogonal init), 1e-2 trained.
DEFAULT_LR: dict[str, float] = {
    # The paper's CIFAR-10 XS value, 6e-2, collapsed AOL XS on Fashion-MNIST to chance on an H100
    # (10.0 % clean, bf16 and fp32 alike, 40 s budget); 1e-2 reached 75.4 % / 67.4 % CRA@36.
    "aol": 1e-2,
    "bcop": 7e-3,
    "cayley": 2e-2,
    "cpl": 3e-2,
    # The paper's 8e-2 made LOT XS on Fashion-MNIST diverge mid-schedule on the 2-core CPU (loss
    # 0.8 → 3.3; 35.0 % clean / 0.9 % CRA@36/255 after 10 min); 2e-2 reached 75.7 % / 66.3 %.
    "lot": 2e-2,
    "sll": 9e-2,
    "soc": 5e-2,
    "standard": 1e-2,
}
#: Measured exceptions to DEFAULT_LR for one (method, size): the CPU-sized AOL xxs trains well at
#: the paper's 6e-2 (75.4 % clean / 68.5 % CRA@36/255 in 3 min on the 2-core CPU) and crawls at
#: 1e-2 on a short CPU budget (41.8 % clean after 2 min on a busy machine).
DEFAULT_LR_BY_SIZE: dict[tuple[str, str], float] = {("aol", "xxs"): 6e-2}
#: Weight decay per method (the paper searched 4e-6 … 3e-4); 5e-5 is mid-range for all.
DEFAULT_WEIGHT_DECAY: dict[str, float] = {m: 5e-5 for m in DEFAULT_LR}
#: Methods computed with complex FFTs: never run them under bf16 autocast.
FFT_METHODS = frozenset({"cayley", "lot"})
#: Global batch size per device type when none is given. 256 is the comparison paper's; on a
#: CPU a budget buys a few epochs at most, and more, smaller steps win: AOL XS on Fashion-MNIST,
#: 4-minute budget, two runs side by side on this 2-core CPU: batch 64 reached 71.5 % clean /
#: 62.1 % CRA@36/255, batch 256 62.9 % / 42.8 % (20 % more images/s).
DEFAULT_BATCH_SIZE: dict[str, int] = {"cuda": 256, "cpu": 64}
#: CPU exceptions: methods whose per-step parametrization (BCOP's Björck iterations, LOT's
#: per-frequency inverse square roots) costs as much as the images do, so small batches waste it.
#: Two-thread training step at XS on 1×28×28, seconds at batch 64 / 256 (``t64/t256``): LOT 2.76 /
#: 4.14 (0.67), BCOP 0.61 / 1.23 (0.50), against AOL 0.26 / 0.62 (0.41), SOC 0.27, Standard 0.22.
DEFAULT_CPU_BATCH_BY_METHOD: dict[str, int] = {"bcop": 256, "lot": 256}


def default_batch_size(method: str, device_type: str) -> int:
    """The global batch size a run uses when none is given (see :data:`DEFAULT_BATCH_SIZE`)."""
    if device_type == "cpu" and method in DEFAULT_CPU_BATCH_BY_METHOD:
        return DEFAULT_CPU_BATCH_BY_METHOD[method]
    return DEFAULT_BATCH_SIZE.get(device_type, 256)


#: The radii reported at every evaluation (the comparison paper's).
EVAL_EPS: tuple[float, ...] = (36 / 255, 72 / 255, 108 / 255, 1.0)
DEVICES = ("auto", "cpu", "cuda")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh])\s*$")
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | float | int, what: str = "budget") -> float:
    """Seconds in a duration such as ``90s``, ``5m``, ``1.5h``.

    Raises:
        ValueError: naming the bad value and the accepted forms.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.match(str(text))
        if not match:
            raise ValueError(
                f"bad {what} {text!r}; use a positive number with unit s, m or h (e.g. 90s, 5m, 1h)"
            )
        seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"bad {what} {text!r}; it must be positive (e.g. 90s, 5m, 1h)")
    return seconds


def parse_methods(text: str) -> list[str]:
    """``all`` or a comma list → registered method names (validated, order kept, no repeats).

    Raises:
        ValueError: an unknown name, naming the allowed ones.
    """
    from models import list_methods

    allowed = list_methods()
    if text.strip().lower() == "all":
        return allowed
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"no method given; choose from all, {', '.join(allowed)}")
    for n in names:
        if n not in allowed:
            raise ValueError(f"unknown method {n!r}; choose from all, {', '.join(allowed)}")
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; saved as ``config.json`` (resolved) and in the checkpoint.

    Attributes:
        method, size, dataset: what to train (``models.list_methods()``, ``models.list_sizes()``,
            :data:`training.data.DATASETS`).
        budget_s: wall-clock training budget in seconds (evaluation not charged); the one-cycle
            schedule is a function of the elapsed fraction of it. Exclusive with ``epochs``.
        epochs: train for a number of epochs instead (schedule over the step count).
        batch_size: global batch (split across DDP processes); ``None``: per device type,
            :data:`DEFAULT_BATCH_SIZE` (resolved when the run starts, saved in ``config.json``).
        lr, weight_decay: peak learning rate and weight decay; ``None`` → per-method default.
        momentum: SGD momentum.
        eps_train, temperature: offset cross-entropy: offset ``2√2·eps_train``, temperature T.
        warmup_frac, div_factor, final_div_factor: one-cycle shape (torch's OneCycleLR defaults).
        seed: seed of the model init, data order and augmentation.
        device: ``auto`` (CUDA when there is one), ``cpu`` or ``cuda``.
        amp: bf16 autocast on CUDA (never for the FFT methods).
        eval_every: evaluate every this many epochs (``eval_every_s`` for training seconds);
            ``None`` → only at the end.
        checkpoint_every_s: write ``checkpoint.pt`` at least this often (training seconds).
        guard_every: check loss and weights for NaN/Inf every this many steps.
        max_nan_restarts: give up after this many divergences.
        out: parent folder of the runs.
        data_dir: dataset folder (see :func:`training.data.load_dataset`).
        store: save the model to the BentoML model store.
        export: write ``model.onnx`` and evaluate it in ONNX Runtime; off (quick searches): the
            final evaluation runs the audited plain network in torch and nothing is stored.
        eval_batch_size: batch size of evaluation.
        head, activation, pool: LipNet options of Singla & Feizi (``models.heads.HEADS``,
            ``models.activations.ACTIVATIONS``, None or ``models.pooling.POOLS``).
        curvature_weight: weight of the CRC-Lip head's curvature regularizer
            (:meth:`models.heads.CRCHead.curvature_penalty`); only with ``head="crc"``.
        layer_options: extra keyword arguments of every convolution layer (e.g. SOC's
            ``fast_grad``), validated by the layer itself.
    """

    method: str
    size: str = "xs"
    dataset: str = "fashion-mnist"
    budget_s: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float = 0.9
    eps_train: float = 36 / 255
    temperature: float = 0.25
    warmup_frac: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    eval_every: int | None = None
    eval_every_s: float | None = None
    checkpoint_every_s: float = 60.0
    guard_every: int = 20
    max_nan_restarts: int = 5
    out: str = "runs"
    data_dir: str | None = None
    store: bool = True
    export: bool = True
    eval_batch_size: int = 1000
    eval_eps: tuple[float, ...] = field(default=EVAL_EPS)
    head: str = "linear"
    activation: str = "maxmin"
    pool: str | None = None
    curvature_weight: float = 0.0
    layer_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from models import list_methods, list_sizes

        if self.method not in list_methods():
            raise ValueError(
                f"unknown method {self.method!r}; choose from {', '.join(list_methods())}"
            )
        if self.size not in list_sizes():
            raise ValueError(f"unknown size {self.size!r}; choose from {', '.join(list_sizes())}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; choose from {', '.join(DEVICES)}")
        if (self.budget_s is None) == (self.epochs is None):
            raise ValueError("give exactly one of a budget (e.g. --budget 5m) or --epochs N")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ValueError(f"budget must be positive, got {self.budget_s}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        for name in ("batch_size", "eval_batch_size", "guard_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        object.__setattr__(self, "eval_eps", tuple(float(e) for e in self.eval_eps))
        from models.activations import ACTIVATIONS
        from models.heads import HEADS
        from models.pooling import POOLS

        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; choose from {', '.join(HEADS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; choose from {', '.join(ACTIVATIONS)}"
            )
        if self.pool is not None and self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; choose from none, {', '.join(POOLS)}")
        if not (math.isfinite(self.curvature_weight) and self.curvature_weight >= 0):
            raise ValueError(
                f"curvature_weight must be finite and >= 0, got {self.curvature_weight}"
            )
        if self.curvature_weight > 0 and self.head != "crc":
            raise ValueError(f"curvature_weight applies to head 'crc' only, not {self.head!r}")
        object.__setattr__(self, "layer_options", dict(self.layer_options or {}))
        if self.layer_options:
            import inspect

            from models.registry import layer_class

            params = inspect.signature(layer_class(self.method).__init__).parameters
            allowed = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]
            unknown = sorted(set(self.layer_options) - set(allowed))
            if unknown:
                raise ValueError(
                    f"unknown layer option(s) {', '.join(unknown)} for {self.method}; "
                    f"choose from {', '.join(allowed) or 'none'}"
                )

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR_BY_SIZE.get((self.method, self.size), DEFAULT_LR.get(self.method, 5e-2))

    @property
    def wd(self) -> float:
        return (
            DEFAULT_WEIGHT_DECAY.get(self.method, 5e-5)
            if self.weight_decay is None
            else self.weight_decay
        )

    @property
    def offset(self) -> float:
        """The logit offset m = 2√2·ε_train of the loss."""
        return 2 * math.sqrt(2) * self.eps_train

    def resolved(self) -> TrainConfig:
        """The same config with the per-method defaults filled in (what ``config.json`` holds)."""
        return replace(self, lr=self.peak_lr, weight_decay=self.wd)

    @property
    def variant(self) -> str:
        """The non-default LipNet options as a short tag (``""`` for the paper's network)."""
        parts = [] if self.head == "linear" else [self.head]
        parts += [] if self.activation == "maxmin" else [self.activation]
        parts += [] if self.pool is None else [f"{self.pool}pool"]
        parts += [f"{k}={v}" for k, v in sorted(self.layer_options.items())]
        return "+".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eval_eps"] = list(self.eval_eps)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (older or newer checkpoints)."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if "eval_eps" in kwargs:
            kwargs["eval_eps"] = tuple(kwargs["eval_eps"])
        return cls(**kwargs)
