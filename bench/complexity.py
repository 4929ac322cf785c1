"""Asymptotic per-layer cost formulas, summed over a LipNet's layers, and measured FLOPs.

The comparison paper (Prach, Brau, Buttazzo & Lampert, "1-Lipschitz Layers Compared", CVPR 2024,
arXiv:2311.16833, Sec. 3) tabulates per-layer multiply-accumulates (MACs) and memory for batch
``b``, an ``s×s`` map, ``c`` channels, a ``k×k`` kernel and ``t`` inner iterations. Its table text
was not retrievable here, so the formulas below are lipcert's own derivations from each method's
algorithm (see ``shared/METHODS.md``), in the paper's notation, keeping the leading terms:

- ``C = b·s²·c²·k²`` is the MACs of one plain convolution, ``M = b·s²·c + c²·k²`` its memory
  (the activation kept for the backward pass plus the kernel), counted in floats.
- Training counts the forward computation including the re-parametrization (backward costs a
  constant multiple of it); memory counts what autograd keeps alive.
- Cayley and LOT count per-frequency work on ``F ≈ s²/2`` (``N²/2``) rfft frequencies as complex
  arithmetic (4 real MACs per complex MAC); LOT works on ``N = s + 2·(k//2)``.
- Inference counts the materialized form: one plain conv for AOL/BCOP/Standard, two convs for the
  residual CPL/SLL, ``T_eval`` convs for SOC, the FFT form for Cayley/LOT (a materialized full-size
  circular conv would instead cost ``b·s²·c²·s²``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models.layers.soc import SOCConv2d

# Inner-iteration counts the formulas assume (the layer defaults of METHODS.md).
BCOP_BJORCK_ITERS = 20
LOT_NEWTON_SCHULZ_ITERS = 10


@functools.cache
def soc_eval_terms(kernel_size: int) -> int:
    """The polynomial terms SOC evaluates and exports by default for ``kernel_size`` (the
    layer's own choice: the fewest with truncation error <= 1e-4 at its guaranteed norm)."""
    return SOCConv2d(1, kernel_size).eval_terms


#: SOC's default training terms at k = 3 (the fewest with truncation error <= 2e-3).
SOC_TRAIN_TERMS = SOCConv2d(1, 3).train_terms


@dataclass(frozen=True)
class LayerShape:
    """One square convolution as it runs inside a network: channels, kernel, map size."""

    channels: int
    kernel_size: int
    spatial: int


@dataclass(frozen=True)
class CostFormula:
    """Per-layer asymptotic costs of one method: formula text and its evaluation.

    Each function maps ``(b, s, c, k)`` to MACs or floats of memory.
    """

    train_macs: str
    train_memory: str
    infer_macs: str
    infer_memory: str
    f_train_macs: Callable[[int, int, int, int], float]
    f_train_memory: Callable[[int, int, int, int], float]
    f_infer_macs: Callable[[int, int, int, int], float]
    f_infer_memory: Callable[[int, int, int, int], float]


def _conv(b: int, s: int, c: int, k: int) -> float:
    return b * s * s * c * c * k * k


def _mem(b: int, s: int, c: int, k: int) -> float:
    return b * s * s * c + c * c * k * k


def _gram(c: int, k: int) -> float:  # the (2k−1)² Gram kernel KᵀK: c³·k²·(2k−1)² MACs
    return c**3 * k * k * (2 * k - 1) ** 2


def _log2(n: int) -> float:
    return math.log2(max(n, 2))


def _lot_n(s: int, k: int) -> int:
    return s + 2 * (k // 2)


_T, _TN, _TS = BCOP_BJORCK_ITERS, LOT_NEWTON_SCHULZ_ITERS, SOC_TRAIN_TERMS

FORMULAS: dict[str, CostFormula] = {
    "standard": CostFormula(
        "C", "M", "C", "M",
        _conv, _mem, _conv, _mem,
    ),
    "aol": CostFormula(
        "C + c³k²(2k−1)²", "M + c²(2k−1)²", "C", "M",
        lambda b, s, c, k: _conv(b, s, c, k) + _gram(c, k),
        lambda b, s, c, k: _mem(b, s, c, k) + c * c * (2 * k - 1) ** 2,
        _conv, _mem,
    ),
    "bcop": CostFormula(
        f"C + 2tkc³ + k³c³ (t={_T})", f"M + tkc² + k³c² (t={_T})", "C", "M",
        lambda b, s, c, k: _conv(b, s, c, k) + 2 * _T * k * c**3 + k**3 * c**3,
        lambda b, s, c, k: _mem(b, s, c, k) + _T * k * c * c + k**3 * c * c,
        _conv, _mem,
    ),
    "cayley": CostFormula(
        "2bs²c² + 2s²c³ + (2bc + c²)s²·log₂s", "2bs²c + 2s²c²",
        "2bs²c² + 2bc·s²·log₂s", "2bs²c + s²c²",
        lambda b, s, c, k: 2 * b * s * s * c * c + 2 * s * s * c**3
        + (2 * b * c + c * c) * s * s * _log2(s),
        lambda b, s, c, k: 2 * b * s * s * c + 2 * s * s * c * c,
        lambda b, s, c, k: 2 * b * s * s * c * c + 2 * b * c * s * s * _log2(s),
        lambda b, s, c, k: 2 * b * s * s * c + s * s * c * c,
    ),
    "lot": CostFormula(
        f"2bN²c² + 6tN²c³ + (2bc + c²)N²·log₂N (N=s+2⌊k/2⌋, t={_TN})",
        f"2bN²c + 6tN²c² (t={_TN})",
        "2bN²c² + 2bc·N²·log₂N", "2bN²c + N²c²",
        lambda b, s, c, k: 2 * b * _lot_n(s, k) ** 2 * c * c + 6 * _TN * _lot_n(s, k) ** 2 * c**3
        + (2 * b * c + c * c) * _lot_n(s, k) ** 2 * _log2(_lot_n(s, k)),
        lambda b, s, c, k: 2 * b * _lot_n(s, k) ** 2 * c + 6 * _TN * _lot_n(s, k) ** 2 * c * c,
        lambda b, s, c, k: 2 * b * _lot_n(s, k) ** 2 * c * c
        + 2 * b * c * _lot_n(s, k) ** 2 * _log2(_lot_n(s, k)),
        lambda b, s, c, k: 2 * b * _lot_n(s, k) ** 2 * c + _lot_n(s, k) ** 2 * c * c,
    ),
    "cpl": CostFormula(
        "2C + 2s²c²k² (one power-iteration step)", "M + bs²c", "2C", "M + bs²c",
        lambda b, s, c, k: 2 * _conv(b, s, c, k) + 2 * _conv(1, s, c, k),
        lambda b, s, c, k: _mem(b, s, c, k) + b * s * s * c,
        lambda b, s, c, k: 2 * _conv(b, s, c, k),
        lambda b, s, c, k: _mem(b, s, c, k) + b * s * s * c,
    ),
    "sll": CostFormula(
        "2C + c³k²(2k−1)²", "M + bs²c + c²(2k−1)²", "2C", "M + bs²c",
        lambda b, s, c, k: 2 * _conv(b, s, c, k) + _gram(c, k),
        lambda b, s, c, k: _mem(b, s, c, k) + b * s * s * c + c * c * (2 * k - 1) ** 2,
        lambda b, s, c, k: 2 * _conv(b, s, c, k),
        lambda b, s, c, k: _mem(b, s, c, k) + b * s * s * c,
    ),
    "soc": CostFormula(
        f"T·C (T={_TS})", f"T·bs²c + c²k² (T={_TS})",
        f"T·C (T={soc_eval_terms(3)} at k=3, {soc_eval_terms(1)} at k=1)", "M + bs²c",
        lambda b, s, c, k: _TS * _conv(b, s, c, k),
        lambda b, s, c, k: _TS * b * s * s * c + c * c * k * k,
        lambda b, s, c, k: soc_eval_terms(k) * _conv(b, s, c, k),
        lambda b, s, c, k: _mem(b, s, c, k) + b * s * s * c,
    ),
}


def layer_shapes(model: nn.Module, input_shape: tuple[int, int, int]) -> list[LayerShape]:
    """The square method convolutions of ``model`` with the map size each one sees.

    Runs one batch-1 forward pass with hooks on every module that has ``channels`` and
    ``kernel_size`` attributes and an ``export`` method (the layer contract).

    Args:
        model: a LipNet (or any module built from contract layers).
        input_shape: ``(C, H, W)`` of one input image.

    Returns:
        One :class:`LayerShape` per layer call, in execution order.
    """
    shapes: list[LayerShape] = []
    handles = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        shapes.append(LayerShape(module.channels, module.kernel_size, int(args[0].shape[-1])))

    for module in model.modules():
        if hasattr(module, "export") and hasattr(module, "channels") and hasattr(
            module, "kernel_size"
        ):
            handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    try:
        with torch.no_grad():
            model.train()  # train mode: no eval caches are created by this probe pass
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes


def formula_costs(method: str, shapes: list[LayerShape], batch: int) -> dict[str, float] | None:
    """Sum the method's per-layer formulas over ``shapes``.

    Args:
        method: registry name; ``None`` is returned for a method without a formula.
        shapes: from :func:`layer_shapes`.
        batch: the batch size ``b`` (training: the training batch; inference uses ``b = 1``).

    Returns:
        ``train_gmacs`` (per step at ``batch``), ``train_memory_mb``, ``infer_gmacs`` and
        ``infer_memory_mb`` (per image, ``b = 1``); memory at 4 bytes per float.
    """
    formula = FORMULAS.get(method)
    if formula is None:
        return None
    tot = dict(train_gmacs=0.0, train_memory_mb=0.0, infer_gmacs=0.0, infer_memory_mb=0.0)
    for sh in shapes:
        s, c, k = sh.spatial, sh.channels, sh.kernel_size
        tot["train_gmacs"] += formula.f_train_macs(batch, s, c, k) / 1e9
        tot["train_memory_mb"] += formula.f_train_memory(batch, s, c, k) * 4 / 2**20
        tot["infer_gmacs"] += formula.f_infer_macs(1, s, c, k) / 1e9
        tot["infer_memory_mb"] += formula.f_infer_memory(1, s, c, k) * 4 / 2**20
    return tot


def formula_table() -> list[dict[str, str]]:
    """The formula texts, one row per method (for the docs and the markdown report)."""
    return [
        dict(method=m, train_macs=f.train_macs, train_memory=f.train_memory,
             infer_macs=f.infer_macs, infer_memory=f.infer_memory)
        for m, f in FORMULAS.items()
    ]


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them.

    The counter covers matmuls and convolutions (forward and backward); FFTs, elementwise ops and
    linear solves are not counted, so FFT-based methods are undercounted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())
