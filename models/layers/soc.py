"""SOC: Skew Orthogonal Convolutions.

Singla & Feizi, "Skew Orthogonal Convolutions", ICML 2021, arXiv:2105.11417.

The kernel ``L = ½(W − flip(Wᵀ))`` (``W`` transposed over its channel dims and flipped spatially)
makes the zero-padded convolution with ``L`` exactly skew-symmetric as a matrix, on every map
size, so ``exp(L)`` is orthogonal. ``L`` is rescaled to ``correction · L / bound`` and the layer is
a degree-``T`` polynomial of it, ``y = p_T(L)x + b`` (ratio Horner form,
:mod:`models.exp_series`), ``T = train_terms`` in training and ``eval_terms`` at evaluation and
export. ``series`` chooses ``p_T``: ``"chebyshev"`` (default), the Chebyshev truncation of
``exp`` on the segment ``[−ia, ia]`` where the eigenvalues of ``L`` lie, or ``"taylor"``
(the paper's ``Σ Lⁱ/i!``). By default each ``T`` is the fewest whose truncation error
``max_{|λ|≤a} |p_T(iλ) − e^{iλ}|`` is at most :data:`TRUNCATION_TOL` (1e-4; evaluation) or
:data:`TRAIN_TOL` (2e-3; training) at the guaranteed norm ``a`` of ``L`` (below). For
``k > 1`` (``a = 0.7``): Chebyshev 4 and 3 terms, Taylor 6 and 5; ``k = 1`` (``a = 1``):
Chebyshev 5 and 4, Taylor 7 and 6; ``bound="paper"`` (``a = 2.1``): Chebyshev 7 and 6, Taylor
12 and 10. ``a`` is the a-priori bound, not the weights' norm, so the exported graph follows
from the configuration alone (the artifact's structure check rebuilds it from the config); the
audit then bounds the exported polynomial itself, ``max_{|λ|≤‖L‖} |p_T(iλ)|`` at the audited
norm (:func:`certify.rules.exp_polynomial_bound`), so the truncation error is inside the
audited Lipschitz bound (about ``1 + 4e-5`` for Chebyshev at ``T = 4``, ``1 + 3e-5`` for
Taylor at ``T = 6``).

Departure from the paper (and from lipcert before 2026-12): the Chebyshev series. The paper
uses Taylor terms; on a segment of the imaginary axis Chebyshev needs fewer for the same error,
and every term is a convolution in training (three with its gradients) and at inference.
Training at 3 Chebyshev terms (error 1.2e-3 at ``a = 0.7``) is a closer exponential than the
paper's 5 Taylor terms at its scaling (``‖L‖`` up to 2.1, error up to 0.1) and costs 3/5 of
its convolutions.

The bound (``bound="sound"``, the default) is an upper bound of ``‖conv(L)‖₂`` for every map size:
the minimum of Singla & Feizi's "Fantastic Four" bound ``√(hw) · min_i ‖R_i‖₂`` over the four
reshapes ``R_i`` of the kernel (ICLR 2021, arXiv:2012.01580) and the Gershgorin bound
``√(max_a Σ_b Σ_shifts |LᵀL|_ab)`` on the Gram kernel. So ``‖L‖₂ ≤ 0.7`` (``k > 1``; ``1.0`` for
``k = 1``, where the bound is exact) and the truncation error at 12 terms is below
``0.7¹³/13! · e^0.7 < 1e-11`` (6 terms, the default: ``< 4e-5``).

Departure from the paper: its code divides by ``min_i ‖R_i‖₂`` *without* the ``√(hw)`` factor,
which is not an upper bound (we measured ``‖L‖ ≈ 2 · min_i ‖R_i‖`` for random 3×3 kernels): its
effective ``‖L‖`` is up to ``0.7 · k``. ``bound="paper"`` reproduces that scaling (then only
``‖L‖ ≤ 0.7·k = 2.1`` holds, and its default 12 terms give an error below 3e-5).
Approximation: in training the ``‖R_i‖₂`` are power-iteration estimates (one step per forward on
persistent vectors, as in the paper's code); evaluation and export use their exact values (SVD
in float64 of the small reshaped matrices), so the guarantee above is for eval / export.
Padding: zero. Init: ``W ~ N(0, 1/c)``, bias uniform in ``±1/√c`` (as the paper's code).
Inference: :class:`models.plain.ConvExponential` with the scaled kernel, ``eval_terms`` and (for
Chebyshev) the ratio Horner coefficients, stored in the file and audited as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.exp_series import SERIES, exp_coefficients, fewest_terms, horner_ratios
from models.layers.base import LipschitzConv2d
from models.ops import conv_layout, kernel_gram, power_iteration
from models.plain import ConvExponential
from models.registry import register_method
from models.soc_fast import conv_exponential, resolve_grad_mode

BOUNDS = ("sound", "paper")
#: Largest truncation error ``‖exp(L) − p_T(L)‖₂`` the default number of evaluation terms allows.
TRUNCATION_TOL = 1e-4
#: The same for training terms: training only needs a close exponential, every term costs
#: three convolutions there, and evaluation/export use :data:`TRUNCATION_TOL`.
TRAIN_TOL = 2e-3
#: Most evaluation terms the default chooses.
MAX_EVAL_TERMS = 12


def taylor_terms(norm: float, tol: float = TRUNCATION_TOL, max_terms: int = MAX_EVAL_TERMS) -> int:
    """Fewest ``T`` with ``Σ_{i>T} aⁱ/i! ≤ a^{T+1}/(T+1)! · eᵃ ≤ tol`` (``a = norm``), at most
    ``max_terms``. The remainder bound: ``Σ_{j≥0} a^{T+1+j}/(T+1+j)! ≤ a^{T+1}/(T+1)! · Σ aʲ/j!``.
    """
    return fewest_terms("taylor", norm, tol, max_terms)


def skew_kernel(weight: torch.Tensor) -> torch.Tensor:
    """``½(W − flip(Wᵀ))``: the zero-padded conv with it is a skew-symmetric matrix.

    The adjoint of a zero-padded cross-correlation with ``W`` is the one with ``W`` transposed
    over channels and flipped spatially, so subtracting it makes the operator skew.
    """
    return 0.5 * (weight - weight.transpose(0, 1).flip(-2, -1))


def reshaped_matrices(kernel: torch.Tensor) -> list[torch.Tensor]:
    """The four reshapes ``R_1 … R_4`` of a ``(c_out, c_in, h, w)`` kernel (Fantastic Four).

    ``R_1``: ``(c_out·h) × (c_in·w)``; ``R_2``: ``(c_out·w) × (c_in·h)``; ``R_3``:
    ``c_out × (c_in·h·w)``; ``R_4``: ``(c_out·h·w) × c_in``. Each satisfies
    ``‖conv‖₂ ≤ √(hw) · ‖R_i‖₂`` for any padding-free or zero-padded map size.
    """
    c_out, c_in, h, w = kernel.shape
    return [
        kernel.permute(0, 2, 1, 3).reshape(c_out * h, c_in * w),
        kernel.permute(0, 3, 1, 2).reshape(c_out * w, c_in * h),
        kernel.reshape(c_out, c_in * h * w),
        kernel.permute(0, 2, 3, 1).reshape(c_out * h * w, c_in),
    ]


def gershgorin_bound(kernel: torch.Tensor) -> torch.Tensor:
    """``√(max_a Σ_b Σ_shifts |KᵀK|_ab)``: an upper bound of ``‖conv(K)‖₂`` for any zero padding."""
    return kernel_gram(kernel).abs().sum(dim=(1, 2, 3)).max().sqrt()


def spectral_bound(kernel: torch.Tensor, bound: str = "sound") -> torch.Tensor:
    """The scaling denominator of SOC, from exact norms of the reshaped matrices.

    Args:
        kernel: ``(c, c, k, k)`` kernel.
        bound: ``"sound"`` (an upper bound of the operator norm) or ``"paper"`` (``min ‖R_i‖₂``).

    Returns:
        A scalar tensor (differentiable).

    Raises:
        ValueError: unknown ``bound``.
    """
    norms = torch.stack([torch.linalg.matrix_norm(r, ord=2) for r in reshaped_matrices(kernel)])
    return _combine(kernel, norms, bound)


def _combine(kernel: torch.Tensor, norms: torch.Tensor, bound: str) -> torch.Tensor:
    if bound == "paper":
        return norms.min()
    if bound == "sound":
        h, w = kernel.shape[-2:]
        return torch.minimum(math.sqrt(h * w) * norms.min(), gershgorin_bound(kernel))
    raise ValueError(f"unknown bound {bound!r}; choose from {', '.join(BOUNDS)}")


@register_method("soc")
class SOCConv2d(LipschitzConv2d):
    """Skew orthogonal convolution (truncated convolution exponential), zero padding.

    Args:
        channels: input = output channels.
        kernel_size: odd kernel size.
        bias: learned bias added after the exponential.
        train_terms: terms in training (the paper: 5-6 Taylor terms); None (default): the fewest
            whose truncation error is <= :data:`TRAIN_TOL` at the guaranteed norm of ``L``.
        eval_terms: terms at evaluation and export (the paper: 12-15); None (default): the
            fewest whose truncation error is <= :data:`TRUNCATION_TOL` at the guaranteed norm
            of ``L`` (``correction``, or ``correction · k`` with ``bound="paper"``).
        series: ``"chebyshev"`` (default) or ``"taylor"``, see the module docstring.
        correction: target norm of ``L``; default 0.7 for ``k > 1`` and 1.0 for ``k = 1``.
        bound: ``"sound"`` (default) or ``"paper"``, see the module docstring.
        init_iters: power-iteration steps that initialize the persistent vectors.
        fast_grad: training backward through the exponential: False (autograd through the
            Horner loop), True / ``"exact"`` (:mod:`models.soc_fast`, the same gradients from
            the skew-symmetry ``Lᵀ = −L``) or ``"paper"`` (its rank-one kernel-gradient
            shortcut, approximate). Evaluation and export are unaffected.

    Raises:
        ValueError: a bad value among the above.
    """

    padding = "zero"
    lipschitz = True
    orthogonal = True

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        *,
        bias: bool = True,
        train_terms: int | None = None,
        eval_terms: int | None = None,
        series: str = "chebyshev",
        correction: float | None = None,
        bound: str = "sound",
        init_iters: int = 50,
        fast_grad: bool | str = False,
    ) -> None:
        super().__init__(channels, kernel_size, bias=bias)
        terms = {"train_terms": train_terms, "eval_terms": eval_terms}
        for name, value in terms.items():
            if value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if bound not in BOUNDS:
            raise ValueError(f"unknown bound {bound!r}; choose from {', '.join(BOUNDS)}")
        if series not in SERIES:
            raise ValueError(f"unknown series {series!r}; choose from {', '.join(SERIES)}")
        correction = (0.7 if kernel_size > 1 else 1.0) if correction is None else correction
        if not 0 < correction <= 1:
            raise ValueError(f"correction must be in (0, 1], got {correction!r}")
        self.fast_grad = fast_grad  # validated by the property setter
        self.correction, self.bound, self.series = float(correction), bound, series
        norm = self.correction * (kernel_size if bound == "paper" else 1)
        if eval_terms is None:
            eval_terms = fewest_terms(series, norm, TRUNCATION_TOL, MAX_EVAL_TERMS)
        if train_terms is None:
            train_terms = fewest_terms(series, norm, TRAIN_TOL, MAX_EVAL_TERMS)
        self.train_terms, self.eval_terms = train_terms, eval_terms
        # (c₀, r₁, …, r_T) of each polynomial (models.exp_series); Taylor: (1, 1, 1/2, …, 1/T).
        self.train_ratios, self.eval_ratios = (
            tuple(horner_ratios(exp_coefficients(series, t, norm)))
            for t in (train_terms, eval_terms)
        )
        self.weight = nn.Parameter(torch.randn(channels, channels, kernel_size, kernel_size))
        self.weight.data /= math.sqrt(channels)
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        if bias:
            nn.init.uniform_(self.bias, -1 / math.sqrt(channels), 1 / math.sqrt(channels))
        # One persistent right singular vector per reshaped matrix (training estimates only).
        with torch.no_grad():
            for i, r in enumerate(reshaped_matrices(skew_kernel(self.weight))):
                v = torch.randn(r.shape[1])
                _, v = power_iteration(lambda t, r=r: r @ t, lambda t, r=r: r.T @ t, v, init_iters)
                self.register_buffer(f"v{i}", v)

    @property
    def fast_grad(self) -> bool | str:
        """The training backward: False, True / ``"exact"`` or ``"paper"`` (settable)."""
        return self._fast_grad

    @fast_grad.setter
    def fast_grad(self, value: bool | str) -> None:
        # Validate before assigning, so a bad value leaves the layer unchanged.
        self.grad_mode = resolve_grad_mode(value)
        self._fast_grad = value

    def _vectors(self) -> list[torch.Tensor]:
        return [getattr(self, f"v{i}") for i in range(4)]

    def train_kernel(self) -> torch.Tensor:
        """Scaled ``L`` with power-iteration norm estimates (one step; vectors updated)."""
        skew = skew_kernel(self.weight)
        norms = []
        for r, buf in zip(reshaped_matrices(skew), self._vectors(), strict=True):
            with torch.no_grad():
                _, v = power_iteration(lambda t, r=r: r @ t, lambda t, r=r: r.T @ t, buf, 1)
                buf.copy_(v)
            norms.append((r @ v).norm())  # the fresh v: autograd saves it, the buffer changes
        return self.correction * skew / _combine(skew, torch.stack(norms), self.bound)

    def eval_kernel(self) -> torch.Tensor:
        """Scaled ``L`` with exact norms, computed in float64 (eval forward and export)."""
        skew = skew_kernel(self.weight.double())
        return (self.correction * skew / spectral_bound(skew, self.bound)).to(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        if self.training:
            kernel, ratios = self.train_kernel(), self.train_ratios
            x = conv_layout(x)
        else:
            kernel, ratios = self.cached("kernel", self.eval_kernel), self.eval_ratios
        p = self.kernel_size // 2
        if self.training and self.grad_mode is not None and torch.is_grad_enabled():
            z = conv_exponential(x, kernel, ratios, self.grad_mode)
        else:
            z = x
            for i in range(len(ratios) - 1, 0, -1):  # Horner: z ← x + r_i L z (r_i on the kernel)
                z = x + F.conv2d(z, kernel * ratios[i], padding=p)
            if ratios[0] != 1:
                z = z * ratios[0]
        if self.bias is not None:
            z = z + self.bias.view(1, -1, 1, 1)
        return z

    @torch.no_grad()
    def export(self) -> nn.Module:
        # Taylor keeps its original graph (the 1/i are constants), so files exported before the
        # Chebyshev series still pass the structure check; other series store their ratios.
        ratios = None if self.series == "taylor" else self.eval_ratios
        return ConvExponential(self.eval_kernel(), self.eval_terms, self.bias, ratios=ratios)

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", train_terms={self.train_terms}, eval_terms={self.eval_terms}, "
            f"series={self.series}, correction={self.correction:g}, bound={self.bound}, "
            f"fast_grad={self.grad_mode or False}"
        )
