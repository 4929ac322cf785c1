"""Lipschitz audit of an exported (plain) network: a proven upper bound per layer, multiplied.

A certificate needs an *upper* bound of the Lipschitz constant; power iteration only gives a
*lower* estimate. :func:`audit` walks the plain network (``Sequential(body=..., head=...)`` from
``LipNet.export()``), records each layer's input size with one forward pass, and bounds every
leaf module by a rule that is a theorem, never an estimate:

=========================  =====================================================================
layer                      upper bound
=========================  =====================================================================
``CircularConv2d``         exact: largest singular value over the per-frequency matrices of the
                           2-D DFT at the layer's input size (Sedghi et al., ICLR 2019), float64
``nn.Conv2d`` (zeros)      zero padding ``p`` then circular convolution on ``n + 2p`` then a crop
                           equals the zero-padded convolution, so the exact circular norm at
                           ``n + 2p`` bounds it (the embedding is an isometry, the crop a
                           projection); any stride (subsampling is a projection)
``ResidualConv2d``         Jacobian ``I − VᵀDV`` with ``V = diag(√scale) K``, ``D ∈ [0, 1]``
                           diagonal: ``max(1, ‖V‖² − 1)`` (``‖V‖`` bounded as ``nn.Conv2d``)
``ConvExponential``        ``p(L) = Σ_{i≤T} Lⁱ/i!``; ``L = A + S`` (skew + symmetric part, S is
                           float32 rounding only); ``p(A)`` is normal with eigenvalues ``p(iλ)``,
                           ``|λ| ≤ ‖A‖``: ``max_{|λ|≤a} |p(iλ)| + p̄(a + s) − p̄(a)``, see
                           :func:`exp_polynomial_bound`
``nn.Linear``              exact: largest singular value (float64)
``lipschitz_upper_bound``  the module's own method (e.g. ``FourierConv2d`` of Cayley / LOT)
parameter-free blocks      1 (MaxMin, FirstChannels, ZeroChannelConcat, PixelUnshuffle,
                           InputCentering, ZeroPad, Flatten, Identity, ReLU)
anything else              ``TypeError``: never guess
=========================  =====================================================================

Every float64 result is multiplied by ``1 + ROUNDING_MARGIN`` to absorb the float64 error of the
FFT and the SVD (backward stable, error ``O(n·2⁻⁵³)·‖A‖``).

The audit also runs power iteration on each parametrized layer (at its input size, through
autograd) and fails if a lower estimate ever exceeds its upper bound: a self-check of the rules.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from models import blocks, plain

logger = logging.getLogger(__name__)

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
    """A layer's bound failed its own self-check (a lower estimate above the upper bound)."""


@dataclass(frozen=True)
class LayerBound:
    """One row of the audit table.

    Attributes:
        name: qualified module name in the plain network (``body.block0.conv1``).
        type: the module's class name.
        part: ``"body"`` or ``"head"``.
        input_shape: ``(C, H, W)`` (or ``(d,)``) the layer sees at the audited input size.
        bound: proven upper bound of its Lipschitz constant.
        how: the rule that produced ``bound``.
        lower: power-iteration lower estimate (None for parameter-free layers).
    """

    name: str
    type: str
    part: str
    input_shape: tuple[int, ...]
    bound: float
    how: str
    lower: float | None = None


@dataclass
class AuditResult:
    """The audited bounds of a plain network at one input shape.

    Attributes:
        input_shape: ``(C, H, W)``.
        rows: one :class:`LayerBound` per leaf layer, in forward order.
        body_bound, head_bound: products over the body's and the head's layers.
        bound: ``body_bound * head_bound``, the whole network's upper bound.
        certificate: ``"linear_head"`` when the head is an affine map (its rows are in
            ``head_rows``), ``"pairwise"`` when the head proves a Lipschitz constant for each
            logit difference (``pairwise_lipschitz()``, the CRC-Lip head), else ``"generic"``.
        head_rows: ``(num_classes, d)`` float64 rows of the affine head, or None.
        head_pairs: ``(num_classes, num_classes)`` float64 Lipschitz constants of ``z_i − z_j``
            as functions of the body output (row distances for a linear head), or None.
        lower: power-iteration lower estimate of the whole network (None if not computed).
        body_lower: the same for the body.
    """

    input_shape: tuple[int, ...]
    rows: list[LayerBound]
    body_bound: float
    head_bound: float
    bound: float
    certificate: str
    head_rows: np.ndarray | None = field(default=None, repr=False)
    head_pairs: np.ndarray | None = field(default=None, repr=False)
    lower: float | None = None
    body_lower: float | None = None

    def certificate_kwargs(self) -> dict:
        """Keyword arguments of :func:`certify.certified_radius` for this certificate."""
        if self.head_pairs is not None:
            return dict(lipschitz_bound=self.body_bound, head_distances=self.head_pairs)
        return dict(lipschitz_bound=self.bound)

    def table(self) -> str:
        """The per-layer table as aligned plain text."""
        header = ("layer", "type", "input", "upper bound", "lower est.", "method of bound")
        lines = [
            (
                r.name, r.type, "x".join(map(str, r.input_shape)), f"{r.bound:.6f}",
                "" if r.lower is None else f"{r.lower:.6f}", r.how,
            )
            for r in self.rows
        ]
        widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*x) for x in lines]
        out.append(f"body bound   {self.body_bound:.6f}" + _lower_text(self.body_lower))
        out.append(f"head bound   {self.head_bound:.6f}")
        out.append(f"whole bound  {self.bound:.6f}" + _lower_text(self.lower))
        out.append(f"certificate  {self.certificate}")
        return "\n".join(out)

    def to_dict(self) -> dict:
        """JSON-ready summary (without the head rows)."""
        return dict(
            input_shape=list(self.input_shape), bound=self.bound, body_bound=self.body_bound,
            head_bound=self.head_bound, certificate=self.certificate, lower=self.lower,
            body_lower=self.body_lower,
            layers=[{**asdict(r), "input_shape": list(r.input_shape)} for r in self.rows],
        )


def _lower_text(lower: float | None) -> str:
    return "" if lower is None else f"   (power-iteration lower estimate {lower:.6f})"


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


def exp_polynomial_bound(terms: int, a: float, s: float = 0.0, grid: int = 4097) -> float:
    """Rigorous upper bound of ``‖p(A + S)‖`` for ``p(x) = Σ_{i=0}^{T} xⁱ/i!``.

    ``A`` skew-symmetric with ``‖A‖ ≤ a``, ``S`` any operator with ``‖S‖ ≤ s``.

    - ``p(A)`` is normal with eigenvalues ``p(iλ)``, ``λ ∈ [−a, a]``, so
      ``‖p(A)‖ = max_{|λ|≤a} |p(iλ)|`` (``|p(iλ)| = |p(−iλ)|``: real coefficients).
    - The maximum over ``[0, a]`` is taken on a grid of spacing ``h`` and padded by ``h/2`` times
      the Lipschitz constant of ``λ ↦ |p(iλ)|``. Since ``p' = p − x^T/T!``,
      ``d|p(iλ)|/dλ = Re(−i·conj(p)·(iλ)^T/T!)/|p| ≤ λ^T/T! ≤ a^T/T!``: tiny, so the grid is tight.
    - ``‖p(A + S) − p(A)‖ ≤ Σ_i ((a + s)ⁱ − aⁱ)/i! = p̄(a + s) − p̄(a)`` with ``p̄`` the same
      polynomial (positive coefficients): expand ``(A + S)ⁱ``, every term but ``Aⁱ`` has an ``S``.

    Args:
        terms: ``T`` (>= 0).
        a: upper bound of ``‖A‖``.
        s: upper bound of ``‖S‖``.
        grid: grid points on ``[0, a]``.

    Returns:
        The upper bound, rounded up by ``ROUNDING_MARGIN`` relative to ``p̄(a + s)``.
    """
    if terms < 0 or a < 0 or s < 0:
        raise ValueError(f"need terms >= 0, a >= 0, s >= 0; got {terms}, {a}, {s}")
    coeffs = [1.0 / math.factorial(i) for i in range(terms + 1)]

    def p_bar(x: float) -> float:
        return sum(c * x**i for i, c in enumerate(coeffs))

    lam = np.linspace(0.0, a, grid)
    z = 1j * lam
    val = np.zeros_like(z)
    for c in reversed(coeffs):  # Horner in complex128
        val = val * z + c
    h = a / (grid - 1) if grid > 1 else a
    slope = a**terms / math.factorial(terms)
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
    bound = exp_polynomial_bound(m.terms, a, s)
    return bound, f"max|p(iλ)|, |λ|≤{a:.4f} (+sym {s:.1e}), T={m.terms}"


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


# -- power iteration ---------------------------------------------------------------------------
def _local_norm(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, steps: int, gen: torch.Generator
) -> float:
    """Power iteration on ``JᵀJ`` of ``f`` at ``x`` (forward-mode JVP, reverse-mode VJP)."""
    _, vjp_fn = torch.func.vjp(f, x)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    sigma = 0.0
    for _ in range(steps):
        v = v / v.norm().clamp_min(1e-300)
        _, jv = torch.func.jvp(f, (x,), (v,))
        sigma = float(jv.norm())
        (v,) = vjp_fn(jv)
    return sigma


def power_iteration_lower(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    steps: int = 50,
    points: int = 4,
    seed: int = 0,
) -> float:
    """Power-iteration *lower* estimate of a network's Lipschitz constant (never a certificate).

    At ``points`` random inputs in ``[0, 1]``, iterates ``v ← Jᵀ J v`` with autograd (JVP and VJP
    in float64) and returns the largest ``‖J v‖``: each is the norm of a local Jacobian, hence at
    most the Lipschitz constant (up to float64 rounding).

    Args:
        model: any differentiable module (copied, converted to float64, eval mode).
        input_shape: ``(C, H, W)`` (a leading batch dim of 1 is accepted).
        steps: iterations per point.
        points: random input points.
        seed: seed of the points and start vectors.

    Returns:
        The largest estimate over the points.
    """
    shape = _chw(input_shape)
    f = copy.deepcopy(model).to(torch.float64).eval()
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    with torch.enable_grad():
        for _ in range(points):
            x = torch.rand((1, *shape), generator=gen, dtype=torch.float64)
            best = max(best, _local_norm(f, x, steps, gen))
    return best


# -- the audit ---------------------------------------------------------------------------------
def _chw(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    return shape


def _own_rule(module: nn.Module, attr: str) -> bool:
    """A module's self-description (``lipschitz_upper_bound``, ``affine``,
    ``pairwise_lipschitz``) is trusted only from lipcert's own plain classes."""
    return type(module).__module__.startswith("models.") and hasattr(module, attr)


def _has_rule(module: nn.Module) -> bool:
    return (
        _own_rule(module, "lipschitz_upper_bound")
        and callable(module.lipschitz_upper_bound)
    ) or type(module) in _RULES


def _leaves(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """Leaf layers in forward order: a module with its own rule is a leaf; Sequential recurses.

    Every entry of a Sequential counts, repeats included (``named_children`` would skip a
    module that appears twice, and so undercount its Lipschitz constant).
    """
    if type(module) is nn.Sequential and not _has_rule(module):
        out: list[tuple[str, nn.Module]] = []
        for name, child in module._modules.items():
            if child is None:
                raise AuditError(f"{prefix or 'model'}.{name} is None inside a Sequential")
            out += _leaves(child, f"{prefix}.{name}" if prefix else name)
        return out
    return [(prefix, module)]


def _trace_shapes(model: nn.Module, shape: tuple[int, ...], leaves: list) -> list[tuple]:
    """The input shape of each leaf occurrence, in order; refuses leaves called otherwise."""
    calls: dict[int, list[tuple]] = {}

    def record(mod: nn.Module, args: tuple) -> None:  # must return None: a value replaces args
        calls.setdefault(id(mod), []).append(tuple(args[0].shape[1:]))

    unique = {id(m): m for _, m in leaves}
    hooks = [m.register_forward_pre_hook(record) for m in unique.values()]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *shape)))
    finally:
        for h in hooks:
            h.remove()
    occurrences: dict[int, int] = {}
    for _, m in leaves:
        occurrences[id(m)] = occurrences.get(id(m), 0) + 1
    shapes = []
    seen: dict[int, int] = {}
    for name, m in leaves:
        made = len(calls.get(id(m), []))
        if made != occurrences[id(m)]:
            raise AuditError(
                f"layer {name} is called {made} times but appears {occurrences[id(m)]} times in "
                "the network; the audit proves only plain sequential compositions"
            )
        k = seen.get(id(m), 0)
        seen[id(m)] = k + 1
        shapes.append(calls[id(m)][k])
    return shapes


def head_rows(head: nn.Module, input_shape: tuple[int, ...]) -> np.ndarray:
    """Rows ``w_j`` of an affine head ``z = W h + b`` (float64), via one VJP per class.

    Args:
        head: the head (affine: only affine layers and slicing/flattening).
        input_shape: the head's input shape without batch.

    Returns:
        ``(num_classes, d)`` with ``d = prod(input_shape)``.
    """
    f = copy.deepcopy(head).to(torch.float64).eval()
    x = torch.zeros((1, *input_shape), dtype=torch.float64)
    with torch.enable_grad():
        out, vjp_fn = torch.func.vjp(f, x)
        rows = []
        for j in range(out.shape[1]):
            e = torch.zeros_like(out)
            e[0, j] = 1.0
            rows.append(vjp_fn(e)[0].flatten())
    return torch.stack(rows).numpy()


def _is_affine_head(leaves: list[tuple[str, nn.Module]]) -> bool:
    affine = _affine_types()
    linear_glue = (blocks.FirstChannels, blocks.Flatten, nn.Flatten, nn.Identity)
    # A plain head may declare itself affine (``affine = True``, e.g. the LLN head).
    def is_affine(m: nn.Module) -> bool:
        return type(m) in affine or (_own_rule(m, "affine") and m.affine is True)

    return all(is_affine(m) or type(m) in linear_glue for _, m in leaves) and any(
        is_affine(m) for _, m in leaves
    )


def audit(
    plain_model: nn.Module,
    input_shape: Sequence[int],
    *,
    lower: bool = True,
    layer_lower_steps: int = 30,
    lower_steps: int = 30,
    lower_points: int = 2,
) -> AuditResult:
    """Audit a plain network: per-layer proven upper bounds, their product, the head certificate.

    Args:
        plain_model: ``Sequential(body=..., head=...)`` from ``LipNet.export()`` (a network
            without that split is audited as one body with an identity head).
        input_shape: ``(C, H, W)`` the network is audited at (circular and zero-padded bounds
            depend on the size).
        lower: also compute power-iteration lower estimates (per layer, body and whole).
        layer_lower_steps, lower_steps, lower_points: power-iteration effort.

    Returns:
        An :class:`AuditResult`.

    Raises:
        TypeError: a layer without a rule.
        AuditError: a lower estimate above its upper bound (a wrong rule or a broken layer).
    """
    shape = _chw(input_shape)
    model = plain_model.eval()
    names = dict(model._modules)
    if type(model) is nn.Sequential and list(names) == ["body", "head"]:
        parts = [("body", names["body"]), ("head", names["head"])]
    elif {"body", "head"} & set(names):
        raise AuditError(
            f"a network with children {list(names)} is not audited: expected exactly "
            "Sequential(body=..., head=...) (what LipNet.export() returns) or a plain Sequential"
        )
    else:
        parts = [("body", model)]
    leaves = [
        (part, *leaf)
        for part, mod in parts
        for leaf in _leaves(mod, part if len(parts) > 1 else "")
    ]
    shapes = _trace_shapes(model, shape, [(n, m) for _, n, m in leaves])
    rows: list[LayerBound] = []
    gen = torch.Generator().manual_seed(0)
    for (part, name, module), in_shape in zip(leaves, shapes, strict=True):
        bound, how = layer_bound(module, in_shape)
        est = None
        if lower and type(module) not in ONE_LIPSCHITZ and len(in_shape) >= 1:
            f = copy.deepcopy(module).to(torch.float64).eval()
            x = torch.rand((1, *in_shape), generator=gen, dtype=torch.float64) - 0.5
            with torch.enable_grad():
                est = _local_norm(f, x, layer_lower_steps, gen)
            if est > bound * (1 + 1e-6) + 1e-9:
                raise AuditError(
                    f"layer {name} ({type(module).__name__}): power iteration {est:.9g} exceeds "
                    f"the upper bound {bound:.9g} ({how})"
                )
        rows.append(LayerBound(name, type(module).__name__, part, in_shape, bound, how, est))
    body_bound = math.prod(r.bound for r in rows if r.part == "body")
    head_bound = math.prod(r.bound for r in rows if r.part == "head")
    head_leaves = [(n, m) for p, n, m in leaves if p == "head"]
    certificate, rows_w, pairs = "generic", None, None
    if len(parts) == 2 and _is_affine_head(head_leaves):
        from certify.radius import head_row_distances

        head_in = next(sh for (p, _, _), sh in zip(leaves, shapes, strict=True) if p == "head")
        rows_w = head_rows(names["head"], head_in)
        pairs = head_row_distances(rows_w).numpy()
        certificate = "linear_head"
    elif len(parts) == 2 and len(head_leaves) == 1 and _own_rule(
        head_leaves[0][1], "pairwise_lipschitz"
    ):
        pairs = np.asarray(head_leaves[0][1].pairwise_lipschitz(), dtype=np.float64)
        if not np.isfinite(pairs).all() or (pairs < 0).any():
            raise AuditError(f"{head_leaves[0][0]}: pairwise_lipschitz() is not finite and >= 0")
        certificate = "pairwise"
    result = AuditResult(
        input_shape=shape, rows=rows, body_bound=body_bound, head_bound=head_bound,
        bound=body_bound * head_bound, certificate=certificate, head_rows=rows_w, head_pairs=pairs,
    )
    if lower:
        result.lower = power_iteration_lower(model, shape, steps=lower_steps, points=lower_points)
        if len(parts) == 2:
            result.body_lower = power_iteration_lower(
                names["body"], shape, steps=lower_steps, points=lower_points
            )
        if result.lower > result.bound * (1 + 1e-6):
            raise AuditError(
                f"whole-network estimate {result.lower} exceeds the bound {result.bound}"
            )
    logger.info("audit at %s: bound %.6f (body %.6f, head %.6f), lower %s",
                shape, result.bound, body_bound, head_bound, result.lower)
    return result


__all__ = [
    "AuditError", "AuditResult", "LayerBound", "ONE_LIPSCHITZ", "ROUNDING_MARGIN", "audit",
    "circular_conv_norm", "exp_polynomial_bound", "head_rows", "layer_bound",
    "power_iteration_lower", "zero_padded_conv_norm",
]
