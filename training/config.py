"""Training configuration: one frozen dataclass, the per-method defaults table, budget parsing.

Units: learning rate per step (SGD), weight decay as SGD's L2 coefficient, ``eps_train`` and
radii in [0, 1]-pixel L2 units, budgets and times in seconds of wall clock.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from certify.radius import STANDARD_EPS
from data import DATASETS
from models import list_methods, list_sizes
from models.network import check_options
from models.registry import check_layer_options, check_name


@dataclass(frozen=True)
class MethodDefaults:
    """One method's training defaults: a row of :data:`METHOD_DEFAULTS`.

    Attributes:
        lr: peak one-cycle learning rate (per SGD step).
        weight_decay: SGD's L2 coefficient (the paper searched 4e-6 … 3e-4; 5e-5 is mid-range).
        cpu_batch_size: global batch on a CPU when none is given (CUDA: :data:`CUDA_BATCH_SIZE`).
        amp: bf16 autocast allowed on CUDA (not for complex FFTs or Björck iterations).
        offset_loss: trained with the offset cross-entropy (:mod:`training.loss`); False: plain
            cross-entropy (the unconstrained baseline, whose margins mean nothing).
        lr_by_size: measured exceptions to ``lr`` for one size.
    """

    lr: float
    weight_decay: float = 5e-5
    cpu_batch_size: int = 64
    amp: bool = True
    offset_loss: bool = True
    lr_by_size: dict[str, float] = field(default_factory=dict)

    def peak_lr(self, size: str) -> float:
        """The peak learning rate at ``size``."""
        return self.lr_by_size.get(size, self.lr)


#: Global batch size on CUDA when none is given: the comparison paper's 256.
CUDA_BATCH_SIZE = 256

#: Per-method training defaults, one row per method. Learning rates: the comparison paper's best
#: CIFAR-10 XS values (Prach et al., CVPR 2024, tables in the appendix) unless a comment says why
#: not. CPU batch: 64, where a budget buys a few epochs at most and more, smaller steps win (AOL XS
#: on Fashion-MNIST, 4-minute budget, two runs side by side on the 2-core CPU: batch 64 reached
#: 71.5 % clean / 62.1 % CRA@36/255, batch 256 62.9 % / 42.8 % at 20 % more images/s); 256 for the
#: methods whose per-step parametrization (BCOP's Björck iterations, LOT's per-frequency inverse
#: square roots) costs as much as the images do, so small batches waste it (two-thread step at XS
#: on 1×28×28, seconds at batch 64 / 256: LOT 2.76 / 4.14, BCOP 0.61 / 1.23, against AOL 0.26 /
#: 0.62, SOC 0.27, Standard 0.22). No bf16 autocast: the FFT methods (complex arithmetic) and BCOP
#: (its Björck orthogonalization in bf16 drifts far from orthogonal).
METHOD_DEFAULTS: dict[str, MethodDefaults] = {
    # The paper's CIFAR-10 XS value, 6e-2, collapsed AOL XS on Fashion-MNIST to chance on an H100
    # (10.0 % clean, bf16 and fp32 alike, 40 s budget); 1e-2 reached 75.4 % / 67.4 % CRA@36. The
    # CPU-sized xxs trains well at 6e-2 (75.4 % clean / 68.5 % CRA@36/255 in 3 min on the 2-core
    # CPU) and crawls at 1e-2 on a short CPU budget (41.8 % clean after 2 min on a busy machine).
    "aol": MethodDefaults(lr=1e-2, lr_by_size={"xxs": 6e-2}),
    # AOC, BRO, Sandwich (docs/new_methods.md): 300 SGD steps on digits xxs, lr 1e-2 / 3e-2 /
    # 1e-1, clean % / CRA@36/255 %: AOC 93.1/85.0, 94.7/88.6, 88.3/69.7; BRO 92.2/85.0,
    # 93.3/87.2, 94.2/88.3; Sandwich 92.2/86.9, 93.3/89.2, 93.9/86.9. No bf16: Björck (AOC) and
    # complex FFTs (BRO, Sandwich).
    "aoc": MethodDefaults(lr=3e-2, amp=False),
    "bcop": MethodDefaults(lr=7e-3, cpu_batch_size=256, amp=False),
    "bro": MethodDefaults(lr=3e-2, amp=False),
    "cayley": MethodDefaults(lr=2e-2, amp=False),
    "cpl": MethodDefaults(lr=3e-2),
    # The paper's 8e-2 made LOT XS on Fashion-MNIST diverge mid-schedule on the 2-core CPU (loss
    # 0.8 → 3.3; 35.0 % clean / 0.9 % CRA@36/255 after 10 min); 2e-2 reached 75.7 % / 66.3 %.
    "lot": MethodDefaults(lr=2e-2, cpu_batch_size=256, amp=False),
    "sandwich": MethodDefaults(lr=3e-2, amp=False),
    "sll": MethodDefaults(lr=9e-2),
    "soc": MethodDefaults(lr=5e-2),
    # Ours: plain cross-entropy without any norm constraint diverged at 5e-2 on digits (with an
    # orthogonal init), 1e-2 trained.
    "standard": MethodDefaults(lr=1e-2, offset_loss=False),
}
#: The defaults of a registered method without a row above.
FALLBACK_DEFAULTS = MethodDefaults(lr=5e-2)


def method_defaults(method: str) -> MethodDefaults:
    """``method``'s row of :data:`METHOD_DEFAULTS` (:data:`FALLBACK_DEFAULTS` without one)."""
    return METHOD_DEFAULTS.get(method, FALLBACK_DEFAULTS)


def default_batch_size(method: str, device_type: str) -> int:
    """The global batch size a run uses when none is given (see :data:`METHOD_DEFAULTS`)."""
    if device_type == "cpu":
        return method_defaults(method).cpu_batch_size
    return CUDA_BATCH_SIZE


#: The radii reported at every evaluation: the comparison paper's.
EVAL_EPS: tuple[float, ...] = STANDARD_EPS
#: The budget of a run given neither a budget nor a number of epochs (the CLI's default).
DEFAULT_BUDGET_S = 300.0
#: Seed streams: the data order of epoch ``e`` is seeded ``seed·ORDER_SEED_STRIDE + e``, and the
#: augmentation of rank ``r`` resumed at step ``s`` ``seed·AUGMENT_SEED_STRIDE + r +
#: AUGMENT_STEP_STRIDE·s`` (primes, so no two runs, epochs, ranks or resumptions share a stream).
ORDER_SEED_STRIDE = 1_000_003
AUGMENT_SEED_STRIDE = 7919
AUGMENT_STEP_STRIDE = 104_729
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
            :data:`data.DATASETS`).
        budget_s: wall-clock training budget in seconds (evaluation not charged); the one-cycle
            schedule is a function of the elapsed fraction of it. Exclusive with ``epochs``.
        epochs: train for a number of epochs instead (schedule over the step count).
        batch_size: global batch (split across DDP processes); ``None``: per device type and
            method, :func:`default_batch_size` (resolved when the run starts, saved in
            ``config.json``).
        lr, weight_decay: peak learning rate and weight decay; ``None`` → the method's row of
            :data:`METHOD_DEFAULTS`.
        momentum: SGD momentum.
        eps_train, temperature: offset cross-entropy: offset ``2√2·eps_train``, temperature T.
        warmup_frac, div_factor, final_div_factor: one-cycle shape (torch's OneCycleLR defaults).
        seed: seed of the model init, data order and augmentation (:meth:`order_seed`,
            :meth:`augment_seed`).
        device: ``auto`` (CUDA when there is one), ``cpu`` or ``cuda``.
        amp: bf16 autocast on CUDA (only for methods whose row allows it).
        eval_every: evaluate every this many epochs (``eval_every_s`` for training seconds);
            ``None`` → only at the end.
        checkpoint_every_s: write ``checkpoint.pt`` at least this often (training seconds).
        guard_every: check loss and weights for NaN/Inf every this many steps.
        max_nan_restarts: give up after this many divergences.
        out: parent folder of the runs.
        data_dir: dataset folder (see :func:`data.load_dataset`).
        store: save the model to the BentoML model store.
        export: write ``model.onnx`` and evaluate it in ONNX Runtime; off (quick searches): the
            final evaluation runs the audited plain network in torch and nothing is stored.
        eval_batch_size: batch size of evaluation.
        head, activation, pool: LipNet options of Singla & Feizi (``models.heads.HEADS``,
            ``models.activations.ACTIVATIONS``, None or ``models.pooling.POOLS``).
        curvature_weight: weight of the CRC-Lip head's curvature regularizer
            (:meth:`models.heads.CRCHead.curvature_penalty`); only with ``head="crc"``.
        ema_decay: per-step decay of an exponential moving average of the weights
            (:mod:`training.averaging`) that is evaluated, exported and audited at the end
            instead of the last weights; None: no average.
        layer_options: extra keyword arguments of every convolution layer (e.g. SOC's
            ``fast_grad``), validated by the layer itself.
        preset: name of the :data:`training.presets.PRESETS` row that filled in the fields not
            given on the command line (None: no preset); informational.
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
    ema_decay: float | None = None
    layer_options: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None

    def __post_init__(self) -> None:
        check_name("method", self.method, list_methods())
        check_name("size", self.size, list_sizes())
        check_name("dataset", self.dataset, DATASETS)
        check_name("device", self.device, DEVICES)
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
        check_options(head=self.head, activation=self.activation, pool=self.pool)
        if not (math.isfinite(self.curvature_weight) and self.curvature_weight >= 0):
            raise ValueError(
                f"curvature_weight must be finite and >= 0, got {self.curvature_weight}"
            )
        if self.curvature_weight > 0 and self.head != "crc":
            raise ValueError(f"curvature_weight applies to head 'crc' only, not {self.head!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) (e.g. 0.999), got {self.ema_decay}")
        object.__setattr__(self, "layer_options", dict(self.layer_options or {}))
        check_layer_options(self.method, self.layer_options)

    @property
    def defaults(self) -> MethodDefaults:
        """This method's row of :data:`METHOD_DEFAULTS`."""
        return method_defaults(self.method)

    @property
    def peak_lr(self) -> float:
        return self.defaults.peak_lr(self.size) if self.lr is None else self.lr

    @property
    def wd(self) -> float:
        return self.defaults.weight_decay if self.weight_decay is None else self.weight_decay

    @property
    def offset(self) -> float:
        """The logit offset m = 2√2·ε_train of the loss."""
        return 2 * math.sqrt(2) * self.eps_train

    def resolved(self, device_type: str | None = None) -> TrainConfig:
        """The same config with the per-method defaults filled in (what ``config.json`` holds).

        Args:
            device_type: ``"cpu"`` or ``"cuda"``: also fill in the batch size for that device.
        """
        batch = self.batch_size
        if batch is None and device_type is not None:
            batch = default_batch_size(self.method, device_type)
        return replace(self, lr=self.peak_lr, weight_decay=self.wd, batch_size=batch)

    def order_seed(self, epoch: int) -> int:
        """Seed of epoch ``epoch``'s data order (the same on every rank and on resume)."""
        return self.seed * ORDER_SEED_STRIDE + epoch

    def augment_seed(self, rank: int, step: int) -> int:
        """Seed of the augmentation stream of ``rank`` when training (re)starts at ``step``."""
        return self.seed * AUGMENT_SEED_STRIDE + rank + AUGMENT_STEP_STRIDE * step

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
