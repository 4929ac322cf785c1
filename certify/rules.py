"""The per-layer Lipschitz rules of the audit: a proven upper bound for each plain layer type.

Each rule is a theorem about the layer's exact map (see the table in :mod:`certify.audit`);
float64 results are rounded up by :data:`ROUNDING_MARGIN`. A layer type without a rule is a
``TypeError``: the audit never guesses. A layer's own ``lipschitz_upper_bound()`` (and its
``affine`` / ``pairwise_lipschitz`` self-descriptions) are trusted only from lipcert's own plain
classes (defined in the ``models`` package).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from models import blocks, plain
from models.exp_series import exp_coefficients

#: Relative margin on float64 norms (FFT + LAPACK SVD rounding is ~1e-14 at these sizes).
ROUNDING_MARGIN = 1e-9
#: Frequencies per batched SVD call, bounding the audit's memory on large layers.
_SVD_CHUNK = 256

#: Exactly these types are 1-Lipschitz without parameters (exact type match: a subclass could
#: override ``forward``).
ONE_LIPSCHITZ: tuple[type[nn.Module], ...] = (
    blocks.MaxMin, blocks.FirstChannels, blocks.ZeroChannelConcat, blocks.InputCentering,
    blocks.ZeroPad, blocks.Flatten, nn.Flatten, nn.PixelUnshuffle, nn.PixelShuffle, nn.Identity,
    nn.ReLU,
)



class AuditError(RuntimeError):
    """A layer's bound failed its own self-check, or a structure the audit does not prove."""


# -- norms of convolutions ---------------------------------------------------------------------
def circular_conv_norm(kernel: torch.Tensor, n: int, m: int | None = None) -> float:
    """Exact spectral norm of the stride-1 circular convolution on ``n × m`` (float64).

    Uses the real FFT: the matrices at frequencies ``f`` and ``−f`` are complex conjugates, so
    the half spectrum holds every singular value. Frequencies go through the SVD in chunks.
    Not yet rounded up: callers multiply by ``1 + ROUNDING_MARGIN``.

    Args:
        kernel: ``(c_out, c_in, k, k')`` kernel (cross-correlation, centre tap at ``k // 2``).
        n, m: image height and width (``m = n`` by default).

    Returns:
        The largest singular value.

    Raises:
        ValueError: when the kernel is larger than the image.
    """
    m = n if m is None else m
    k = kernel.detach().to(torch.float64).cpu()
    c_out, c_in, kh, kw = k.shape
    if kh > n or kw > m:
        raise ValueError(f"kernel {kh}x{kw} larger than the image {n}x{m}")
    if kh == 1 and kw == 1:  # one matrix at every frequency
        return float(torch.linalg.matrix_norm(k[:, :, 0, 0], ord=2))
    # The per-frequency matrix's singular values do not depend on the tap placement (a shift
    # is a unit-modulus phase per frequency), so no flip or centring is needed here.
    padded = k.new_zeros(c_out, c_in, n, m)
    padded[..., :kh, :kw] = k
    spec = torch.fft.rfft2(padded).permute(2, 3, 0, 1).reshape(-1, c_out, c_in)
    best = 0.0
    for start in range(0, spec.shape[0], _SVD_CHUNK):
        best = max(best, float(torch.linalg.svdvals(spec[start : start + _SVD_CHUNK]).max()))
    return best


def zero_padded_conv_norm(kernel: torch.Tensor, n: int, m: int, pad_h: int, pad_w: int) -> float:
    """Upper bound of a zero-padded convolution's norm on ``n × m`` inputs (any stride).

    Zero padding by ``(pad_h, pad_w)`` (an isometry), a circular convolution on the padded
    ``(n + 2·pad_h) × (m + 2·pad_w)`` image, and a crop to the outputs whose window does not wrap
    (a projection) compose to the zero-padded convolution; striding only drops outputs. Hence
    ``‖conv‖ ≤ ‖circular conv on the padded size‖``, computed exactly by :func:`circular_conv_norm`.
    """
    big_n, big_m = n + 2 * pad_h, m + 2 * pad_w
    kh, kw = kernel.shape[-2:]
    big_n, big_m = max(big_n, kh), max(big_m, kw)  # a larger circle still contains the windows
    return circular_conv_norm(kernel, big_n, big_m)


def exp_polynomial_bound(
    coefficients: int | Sequence[float], a: float, s: float = 0.0, grid: int = 4097
) -> float:
    """Rigorous upper bound of ``‖p(A + S)‖`` for a real polynomial ``p(x) = Σ_{i≤T} c_i xⁱ``.

    ``A`` skew-symmetric with ``‖A‖ ≤ a``, ``S`` any operator with ``‖S‖ ≤ s``.

    - ``p(A)`` is normal with eigenvalues ``p(iλ)``, ``λ ∈ [−a, a]``, so
      ``‖p(A)‖ = max_{|λ|≤a} |p(iλ)|`` (``|p(iλ)| = |p(−iλ)|``: real coefficients).
    - The maximum over ``[0, a]`` is taken on a grid of spacing ``h`` and padded by ``h/2`` times
      the Lipschitz constant of ``λ ↦ |p(iλ)|``: ``d|p(iλ)|/dλ = Re(conj(p)·i·p'(iλ))/|p|``
      and ``Re(conj(p)·i·p) = 0``, so it is at most ``|p'(iλ) − p(iλ)| ≤ Σ_k |(k+1)c_{k+1} − c_k|
      aᵏ`` (``c_{T+1} = 0``); for a polynomial close to ``exp`` (Taylor: just ``a^T/T!``) that is
      tiny, so the grid is tight.
    - ``‖p(A + S) − p(A)‖ ≤ Σ_i |c_i|((a + s)ⁱ − aⁱ) = p̄(a + s) − p̄(a)`` with ``p̄`` the
      polynomial of the ``|c_i|``: expand ``(A + S)ⁱ``, every term but ``Aⁱ`` has an ``S``.

    Args:
        coefficients: ``c_0 … c_T``, or an int ``T`` for the Taylor polynomial ``c_i = 1/i!``.
        a: upper bound of ``‖A‖``.
        s: upper bound of ``‖S‖``.
        grid: grid points on ``[0, a]``.

    Returns:
        The upper bound, rounded up by ``ROUNDING_MARGIN`` relative to ``p̄(a + s)``.
    """
    if isinstance(coefficients, int):
        if coefficients < 0:
            raise ValueError(f"need terms >= 0, got {coefficients}")
        coeffs = exp_coefficients("taylor", coefficients, 1.0)
    else:
        coeffs = [float(c) for c in coefficients]
    if not coeffs or not all(math.isfinite(c) for c in coeffs) or a < 0 or s < 0:
        raise ValueError(f"need finite coefficients, a >= 0, s >= 0; got {coeffs}, {a}, {s}")

    def p_bar(x: float) -> float:
        return sum(abs(c) * x**i for i, c in enumerate(coeffs))

    lam = np.linspace(0.0, a, grid)
    z = 1j * lam
    val = np.zeros_like(z)
    for c in reversed(coeffs):  # Horner in complex128
        val = val * z + c
    h = a / (grid - 1) if grid > 1 else a
    shifted = [*coeffs[1:], 0.0]  # c_{k+1}
    slope = sum(
        abs((k + 1) * n - c) * a**k
        for k, (c, n) in enumerate(zip(coeffs, shifted, strict=True))
    )
    skew_part = float(np.abs(val).max()) + 0.5 * h * slope
    perturbation = p_bar(a + s) - p_bar(a)
    return skew_part + perturbation + ROUNDING_MARGIN * p_bar(a + s)


def _flip_transpose(kernel: torch.Tensor) -> torch.Tensor:
    """Kernel of the adjoint of a 'same' zero-padded stride-1 convolution."""
    return kernel.transpose(0, 1).flip(-1, -2)


# -- per-layer rules ---------------------------------------------------------------------------
def _spatial(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) != 3:
        raise ValueError(f"a convolution needs a (C, H, W) input, got {shape}")
    return shape[1], shape[2]


def _round_up(x: float) -> float:
    return x * (1 + ROUNDING_MARGIN)


def _bound_circular(m: plain.CircularConv2d, shape: tuple[int, ...]) -> tuple[float, str]:
    n, w = _spatial(shape)
    return _round_up(circular_conv_norm(m.weight, n, w)), f"exact per-frequency SVD at {n}x{w}"


def _bound_conv2d(m: nn.Conv2d, shape: tuple[int, ...]) -> tuple[float, str]:
    if m.groups != 1 or tuple(m.dilation) != (1, 1):
        raise TypeError(f"nn.Conv2d with groups={m.groups}, dilation={m.dilation} is not audited")
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise TypeError(f"nn.Conv2d with padding={m.padding!r}/{m.padding_mode} is not audited")
    n, w = _spatial(shape)
    ph, pw = m.padding
    bound = _round_up(zero_padded_conv_norm(m.weight, n, w, ph, pw))
    return bound, f"zero pad -> circular SVD at {n + 2 * ph}x{w + 2 * pw}"


def _bound_residual(m: plain.ResidualConv2d, shape: tuple[int, ...]) -> tuple[float, str]:
    n, w = _spatial(shape)
    p = m.weight.shape[-1] // 2
    scale = m.scale.detach().to(torch.float64).flatten()
    kernel = m.weight.detach().to(torch.float64)
    if (scale < 0).any():
        # Not the CPL/SLL form: fall back to the triangle inequality 1 + ‖K‖²·max|scale|.
        k_norm = _round_up(zero_padded_conv_norm(kernel, n, w, p, p))
        return _round_up(1 + k_norm**2 * float(scale.abs().max())), "1 + |scale|·‖K‖² (signed)"
    v = kernel * scale.sqrt().view(-1, 1, 1, 1)
    v_norm = _round_up(zero_padded_conv_norm(v, n, w, p, p))
    return (
        _round_up(max(1.0, v_norm**2 - 1)),
        f"max(1, ‖√s·K‖² − 1), ‖·‖ at {n + 2 * p}x{w + 2 * p}",
    )


def _bound_conv_exponential(m: plain.ConvExponential, shape: tuple[int, ...]) -> tuple[float, str]:
    n, w = _spatial(shape)
    kernel = m.kernel.detach().to(torch.float64)
    k = kernel.shape[-1]
    if kernel.shape[0] != kernel.shape[1] or kernel.shape[-2] != k or k % 2 == 0:
        raise TypeError(f"ConvExponential kernel {tuple(kernel.shape)} is not square and odd")
    adjoint = _flip_transpose(kernel)  # exact adjoint of the zero-padded 'same' convolution
    skew, sym = 0.5 * (kernel - adjoint), 0.5 * (kernel + adjoint)
    p = k // 2
    a = _round_up(zero_padded_conv_norm(skew, n, w, p, p))
    s = _round_up(zero_padded_conv_norm(sym, n, w, p, p)) if sym.abs().max() > 0 else 0.0
    series = "taylor" if m.horner is None else "ratios"
    bound = exp_polynomial_bound(m.coefficients(), a, s)
    return bound, f"max|p(iλ)|, |λ|≤{a:.4f} (+sym {s:.1e}), T={m.terms} ({series})"


def _bound_linear(m: nn.Linear, shape: tuple[int, ...]) -> tuple[float, str]:
    w = m.weight.detach().to(torch.float64)
    return _round_up(float(torch.linalg.matrix_norm(w, ord=2))), "exact SVD"


def _bound_own(m: nn.Module, shape: tuple[int, ...]) -> tuple[float, str]:
    size = getattr(m, "input_size", None)
    if size is not None and len(shape) == 3:
        expected = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if tuple(expected) != tuple(shape[1:]):
            raise ValueError(
                f"{type(m).__name__} is built for input size {expected}, audited at {shape[1:]}"
            )
    bound = float(m.lipschitz_upper_bound())
    if not math.isfinite(bound) or bound < 0:
        raise AuditError(f"{type(m).__name__}.lipschitz_upper_bound() returned {bound}")
    return bound, f"{type(m).__name__}.lipschitz_upper_bound()"


_RULES: dict[type[nn.Module], Callable[[nn.Module, tuple[int, ...]], tuple[float, str]]] = {
    plain.CircularConv2d: _bound_circular,
    nn.Conv2d: _bound_conv2d,
    plain.ResidualConv2d: _bound_residual,
    plain.ConvExponential: _bound_conv_exponential,
    nn.Linear: _bound_linear,
}


def _affine_types() -> tuple[type[nn.Module], ...]:
    """Plain module types that are affine maps (their Jacobian is constant)."""
    types: list[type[nn.Module]] = [
        plain.CircularConv2d, nn.Conv2d, plain.ConvExponential, nn.Linear
    ]
    fourier = getattr(plain, "FourierConv2d", None)  # Cayley / LOT export form, when present
    if fourier is not None:
        types.append(fourier)
    return tuple(types)


def layer_bound(module: nn.Module, input_shape: tuple[int, ...]) -> tuple[float, str]:
    """Proven upper bound of one leaf layer's Lipschitz constant at ``input_shape``.

    Args:
        module: a plain module (see the table in the module docstring).
        input_shape: the shape the layer sees, without the batch dimension.

    Returns:
        ``(bound, how)``.

    Raises:
        TypeError: for any module type without a rule (the audit never guesses).
    """
    if _own_rule(module, "lipschitz_upper_bound") and callable(module.lipschitz_upper_bound):
        return _bound_own(module, input_shape)
    rule = _RULES.get(type(module))
    if rule is not None:
        return rule(module, input_shape)
    if type(module) in ONE_LIPSCHITZ:
        return 1.0, "parameter-free, 1-Lipschitz"
    raise TypeError(
        f"no Lipschitz rule for {type(module).__module__}.{type(module).__name__}; the audit "
        "bounds only known plain layers (never guesses)"
    )


def _own_rule(module: nn.Module, attr: str) -> bool:
    """A module's self-description (``lipschitz_upper_bound``, ``affine``,
    ``pairwise_lipschitz``) is trusted only from lipcert's own plain classes."""
    return type(module).__module__.startswith("models.") and hasattr(module, attr)


def _has_rule(module: nn.Module) -> bool:
    return (
        _own_rule(module, "lipschitz_upper_bound")
        and callable(module.lipschitz_upper_bound)
    ) or type(module) in _RULES


__all__ = [
    "ONE_LIPSCHITZ", "ROUNDING_MARGIN", "AuditError", "circular_conv_norm",
    "exp_polynomial_bound", "layer_bound", "zero_padded_conv_norm",
]
