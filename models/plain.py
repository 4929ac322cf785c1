"""Plain inference modules that the method layers export to.

Every exported network is built from these, ``nn.Conv2d`` (zero padding), ``nn.Linear`` and the
blocks in :mod:`models.blocks`. They hold materialized weights as buffers (float32), contain no
parametrization, export to ONNX with standard operators, and are what :mod:`certify.audit`
bounds, one type at a time.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.exp_series import coefficients_from_ratios, exp_coefficients
from models.fourier_stages import flush_tiny, fourier_stages, one_sided_spectrum_in_h
from models.graph_form import graph_form


class _WrapPad(torch.autograd.Function):
    """Circular padding that the tracer records as one ONNX ``Pad(mode="wrap")`` (graph form 2).

    Inference only (no backward): :func:`circular_pad` uses it while tracing, nowhere else.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: int) -> torch.Tensor:  # noqa: ARG004
        return F.pad(x, (p, p, p, p), mode="circular")

    @staticmethod
    def symbolic(g, x, p: int):  # noqa: ANN001
        pads = torch.tensor([0, 0, p, p, 0, 0, p, p], dtype=torch.int64)  # begins, then ends
        return g.op("Pad", x, g.op("Constant", value_t=pads), mode_s="wrap")


def circular_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    """Circular padding by ``p`` on H and W.

    Eager: slices and concatenations. Traced: one ``Pad(mode="wrap")`` in graph form 2, the same
    slices and concatenations in form 1 (:mod:`models.graph_form`); the values are the same.
    """
    if p == 0:
        return x
    if torch.jit.is_tracing() and graph_form() >= 2:
        return _WrapPad.apply(x, int(p))
    x = torch.cat([x[..., -p:, :], x, x[..., :p, :]], dim=-2)
    return torch.cat([x[..., -p:], x, x[..., :p]], dim=-1)


class CircularConv2d(nn.Module):
    """Stride-1 cross-correlation with circular padding ``k // 2`` (the 'same' size).

    Args:
        weight: ``(c_out, c_in, k, k)`` materialized kernel.
        bias: ``(c_out,)`` or None.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = circular_pad(x, self.weight.shape[-1] // 2)
        return F.conv2d(x, self.weight, self.bias)


class ResidualConv2d(nn.Module):
    """``y = x − Kᵀ(scale ⊙ ReLU(Kx + b))`` with zero padding (CPL and SLL at inference).

    ``K`` is ``(c_inner, c, k, k)``; ``Kᵀ`` is its adjoint (``conv_transpose2d`` with the same
    zero padding is exactly the adjoint of ``conv2d``). ``scale`` is per inner channel (CPL: the
    constant ``2/σ²``; SLL: the vector ``t``). With ``V = diag(√scale) K``, the Jacobian is
    ``I − Vᵀ D V`` with diagonal ``D ∈ [0, 1]``, so the norm is ``max(1, ‖V‖² − 1)``.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("scale", scale.detach().float().reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[-1]
        p = k // 2
        h = F.relu(F.conv2d(x, self.weight, self.bias, padding=p)) * self.scale
        if torch.jit.is_tracing() and graph_form() >= 3:
            # Graph form 3: ``−Kᵀh`` as a convolution with the flipped, transposed, negated
            # kernel, added to x (stride 1: ``conv_transpose2d(h, K, padding=p)`` is
            # ``conv2d(h, flip(K)ᵀ, padding=k−1−p)``). The kernel is computed in the graph
            # from K's initializer (ONNX Runtime folds it once, at session start), so the file
            # holds K alone; the Conv and the Add run in ONNX Runtime's blocked layout.
            adjoint = -self.weight.flip(2, 3).transpose(0, 1)
            return x + F.conv2d(h, adjoint, padding=k - 1 - p)
        return x - F.conv_transpose2d(h, self.weight, padding=p)


class ConvExponential(nn.Module):
    """Polynomial of a skew convolution, ``y = p_T(L)x + b`` (SOC at inference).

    ``L`` is a zero-padded convolution with a skew-symmetric kernel (``L = −flip(Lᵀ)``), so the
    operator is exactly skew-symmetric and ``exp(L)`` orthogonal; ``p_T`` approximates ``exp``
    (:mod:`models.exp_series`), making it approximately so. Without ``ratios``, the Taylor
    polynomial ``Σ_{i≤T} Lⁱ/i!`` in Horner form ``z ← x + L z / i`` for ``i = T … 1`` (the
    ``1/i`` are constants of the graph). With ``ratios = (c₀, r₁, …, r_T)``, the ratio Horner form
    ``z ← x + r_i · L z``, ``y = c₀ z``, the ratios a buffer (``horner``) the file stores and the
    audit reads back.

    Args:
        kernel: ``(c, c, k, k)`` scaled skew kernel, odd ``k``.
        terms: ``T``.
        bias: ``(c,)`` or None.
        ratios: None (Taylor) or ``T + 1`` floats.

    Raises:
        ValueError: ``ratios`` of the wrong length.
    """

    def __init__(
        self,
        kernel: torch.Tensor,
        terms: int,
        bias: torch.Tensor | None = None,
        ratios: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        self.terms = int(terms)
        if ratios is not None and len(ratios) != self.terms + 1:
            raise ValueError(f"{self.terms} terms need {self.terms + 1} ratios, got {len(ratios)}")
        self.register_buffer("kernel", kernel.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        horner = None if ratios is None else torch.tensor(ratios, dtype=torch.float32)
        self.register_buffer("horner", horner)

    def coefficients(self) -> list[float]:
        """``c_0 … c_T`` of the polynomial this module evaluates (float64 of the stored ratios)."""
        if self.horner is None:
            return exp_coefficients("taylor", self.terms, 1.0)
        return coefficients_from_ratios(self.horner.tolist())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.kernel.shape[-1] // 2
        z = x
        if self.horner is None:
            for i in range(self.terms, 0, -1):
                z = x + F.conv2d(z, self.kernel, padding=p) / i
        else:
            for i in range(self.terms, 0, -1):
                z = x + F.conv2d(z, self.kernel, padding=p) * self.horner[i]
            z = z * self.horner[0]
        if self.bias is not None:
            z = z + self.bias.view(1, -1, 1, 1)
        return z

    def extra_repr(self) -> str:
        return f"terms={self.terms}, series={'taylor' if self.horner is None else 'ratios'}"


class StageFactors(NamedTuple):
    """The factors of a :class:`FourierConv2d`'s linear map, read from its stored buffers (float64).

    ``y = dft_hᵀ · inverse_w · Q · dft_w · dft_h · x`` per channel, ``Q`` acting per frequency.
    ``inverse_w`` is None when ``idft_w`` lacks the exact combination structure (then only
    ``‖idft_w‖`` is known, and the blocks are bounded as the stacked ``[Qᵀ_re, Qᵀ_im]``).
    """

    dft_h: torch.Tensor  # (2r, n)
    dft_w: torch.Tensor  # (2N, 2n)
    idft_w: torch.Tensor  # (2n, 4N) as stored
    inverse_w: torch.Tensor | None  # (2n, 2N): idft_w without the combination
    spectrum: torch.Tensor  # (F, c, c) complex128: Q(f) as the blocks apply it


def _max_norm(t: torch.Tensor, chunk: int = 64) -> float:
    """Largest spectral norm over the leading dimension (float64 or complex128 SVD, chunked)."""
    if t.dim() == 2:
        return float(torch.linalg.matrix_norm(t, ord=2))
    return max(
        float(torch.linalg.matrix_norm(t[i : i + chunk], ord=2).max())
        for i in range(0, t.shape[0], chunk)
    )


class FourierConv2d(nn.Module):
    """A circular convolution applied per frequency, with real DFTs written as plain matmuls.

    How the FFT methods (Cayley, LOT, BRO, Sandwich) go to ONNX. The layout is chosen for ONNX
    Runtime on the CPU (measured in ``bench/fourier_forms.py``): frequency-major, so every DFT
    stage is one GEMM with a small constant matrix on the left, the per-frequency products are
    one batched MatMul, and the only data movements are two plain 2-D transposes. For an input
    ``x`` ``(B, C, n, n)``, ``N = n + 2·pad`` (the circular size), ``r = N//2 + 1``::

        (B·C, n²) → (n², B·C)             2-D transpose: pixels major
        dft_h @ ·      (kh, Re|Im, w, B·C)   one-sided real DFT along H (zero padding folded in)
        dft_w @ ·      (kh, kw, Re|Im, B·C)  unitary complex DFT along W, as a real matrix
        · @ blocks     (F, t, Re|Im, B, C)   P[t, j] = X_j Q_tᵀ: ONE batched MatMul, F = r·N
        idft_w @ ·     (kh, Re|Im, w, B·C)   Re/Im of Q·X combined, inverse DFT along W (+ crop)
        dft_hᵀ @ ·     (n², B·C) → (B·C, n²) inverse along H, 2-D transpose back

    The blocks store ``[Re Q(f)ᵀ, Im Q(f)ᵀ]`` (``2c²`` numbers per frequency, half the real
    ``2c × 2c`` form); the sum and difference of the four products are folded into ``idft_w``
    (see :func:`models.fourier_stages.fourier_stages`), which costs no extra pass over the data.
    ONNX's ``DFT`` operator was measured too and is not used: in ONNX Runtime 1.23 it is slower
    than these GEMMs on the CPU and, at LOT's non-power-of-two sizes (34, 18, 10, 6), 10x slower
    and off by up to 1e-4. Tiny entries (float64 noise of exact zeros) are stored as 0
    (:func:`models.fourier_stages.flush_tiny`): in float32 products they turn denormal, slow on
    x86.

    The Lipschitz bound (:meth:`lipschitz_upper_bound`) is ``‖dft_h‖²·‖dft_w‖·‖inverse‖·
    max_f ‖Q(f)‖``, each factor an exact float64 SVD of the stored float32 matrices: tight
    (the DFT stages are isometries up to float32 storage).

    Args:
        spectrum: ``(N, N//2 + 1, c_out, c_in)`` complex one-sided per-frequency matrices of the
            circular convolution on ``N × N`` (as :func:`models.ops.circular_conv_spectrum`
            returns with ``onesided=True``), ``N = input_size + 2·pad``. Use complex128 for an
            exact export; it is stored as float32.
        bias: ``(c_out,)`` or None.
        pad: zero padding before and crop after the circular convolution (LOT, BRO).

    Attributes:
        input_size: the spatial size ``n`` the module accepts (square inputs only).
    """

    def __init__(
        self, spectrum: torch.Tensor, bias: torch.Tensor | None = None, *, pad: int = 0
    ) -> None:
        super().__init__()
        size, half, c_out, c_in = spectrum.shape
        if half != size // 2 + 1 or not spectrum.is_complex():
            raise ValueError(
                f"spectrum must be complex (N, N//2+1, c_out, c_in), got {tuple(spectrum.shape)} "
                f"{spectrum.dtype}"
            )
        if c_out != c_in:
            raise ValueError(f"FourierConv2d is square; got c_out={c_out}, c_in={c_in}")
        if pad < 0 or size - 2 * pad < 1:
            raise ValueError(f"pad={pad} does not fit the circular size {size}")
        self.pad = int(pad)
        self.size = int(size)
        self.input_size = self.size - 2 * self.pad
        q = one_sided_spectrum_in_h(spectrum.detach().to(torch.complex128))  # (r, N, c, c)
        q = q.reshape(half * size, c_out, c_in).transpose(-1, -2)  # Q(f)ᵀ, F = (kh, kw)
        dft_h, dft_w, idft_w = fourier_stages(self.size, self.pad)
        self.register_buffer("dft_h", dft_h.float())
        self.register_buffer("dft_w", dft_w.float())
        self.register_buffer("idft_w", idft_w.float())
        blocks = flush_tiny(torch.stack([q.real, q.imag], dim=1))
        self.register_buffer("blocks", blocks.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, n, n) -> (B, C, n, n)
        # The check is Python-side: skip it while tracing (the exported graph has a fixed size).
        if not torch.jit.is_tracing() and x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"FourierConv2d was exported for {self.input_size}x{self.input_size} inputs, "
                f"got {tuple(x.shape[-2:])}"
            )
        if graph_form() < 2:
            y = self._per_frequency_form1(x)
        else:  # every batch-dependent size is -1: the graph's shapes are constants
            n, size, half = self.input_size, self.size, self.size // 2 + 1
            c = int(self.blocks.shape[-1])
            z = x.reshape(-1, n * n).transpose(0, 1).reshape(n, -1)  # (H, [W, B, C])
            z = torch.matmul(self.dft_h, z).reshape(half, 2 * n, -1)  # (kh, [Re|Im, W], BC)
            z = torch.matmul(self.dft_w, z)  # (kh, [kw, Re|Im], BC)
            z = torch.matmul(z.reshape(half * size, 1, -1, c), self.blocks)  # (F, t, [j, B], C)
            z = torch.matmul(self.idft_w, z.reshape(half, 4 * size, -1))  # (kh, [Re|Im, W], BC)
            z = torch.matmul(self.dft_h.transpose(0, 1), z.reshape(2 * half, -1))
            y = z.reshape(n * n, -1).transpose(0, 1).reshape(-1, c, n, n)  # (B, C, H, W)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def _per_frequency_form1(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without the bias as graph form 1 traces it (sizes from the traced
        batch). Frozen: files of form 1 must keep tracing to exactly these nodes."""
        n, size, half = self.input_size, self.size, self.size // 2 + 1
        b, c = x.shape[0], x.shape[1]
        z = x.reshape(b * c, n * n).transpose(0, 1).reshape(n, n * b * c)  # (H, [W, B, C])
        z = torch.matmul(self.dft_h, z).reshape(half, 2 * n, b * c)  # (kh, [Re|Im, W], BC)
        z = torch.matmul(self.dft_w, z)  # (kh, [kw, Re|Im], BC)
        z = torch.matmul(z.reshape(half * size, 1, 2 * b, c), self.blocks)  # (F, t, [j, B], C)
        z = torch.matmul(self.idft_w, z.reshape(half, 4 * size, b * c))  # (kh, [Re|Im, W], BC)
        z = torch.matmul(self.dft_h.transpose(0, 1), z.reshape(2 * half, n * b * c))
        return z.reshape(n * n, b * c).transpose(0, 1).reshape(b, c, n, n)  # (B, C, H, W)

    @torch.no_grad()
    def stage_factors(self) -> StageFactors:
        """The stored factors in float64 (see :class:`StageFactors`)."""
        idft_w = self.idft_w.double()
        parts = idft_w.reshape(idft_w.shape[0], -1, 2, 2)  # (2n, N, t, j)
        combined = bool(
            torch.equal(parts[..., 1, 1], -parts[..., 0, 0])
            and torch.equal(parts[..., 0, 1], parts[..., 1, 0])
        )
        inverse = parts[..., 0, :].reshape(idft_w.shape[0], -1) if combined else None
        blocks = self.blocks.double()
        spectrum = torch.complex(blocks[:, 0], blocks[:, 1]).transpose(-1, -2)
        return StageFactors(self.dft_h.double(), self.dft_w.double(), idft_w, inverse, spectrum)

    @torch.no_grad()
    def lipschitz_upper_bound(self) -> float:
        """A guaranteed upper bound of the operator norm of the map this module computes.

        The map is ``dft_hᵀ ∘ idft_w ∘ P ∘ dft_w ∘ dft_h`` per channel (``dft_h`` on H for every
        column, ``dft_w`` and ``idft_w`` per ``kh``, ``P`` per frequency), each built from the
        *stored* float32 buffers, and the norm of a composition is at most the product of the
        norms. When ``idft_w`` has the exact combination structure (the export's), ``idft_w ∘ P``
        is ``inverse ∘ (X ↦ Q(f)X)``, the complex product at each frequency, of norm
        ``max_f ‖Q(f)‖``; otherwise it is bounded by ``‖idft_w‖ · max_f ‖[Re Q(f)ᵀ, Im Q(f)ᵀ]‖``.
        Each factor is an exact largest singular value computed in float64 (the bias does not
        change the Lipschitz constant). Float32 *arithmetic* rounding of the matmuls is not a
        linear map and is not covered here: the radius' per-provider float slack
        (:mod:`certify.radius`) covers it, measured by ``tests/test_float_error.py``.
        """
        f = self.stage_factors()
        outer = _max_norm(f.dft_h) ** 2 * _max_norm(f.dft_w)
        if f.inverse_w is not None:
            middle = _max_norm(f.inverse_w) * _max_norm(f.spectrum)
        else:
            stacked = torch.cat([f.spectrum.real, f.spectrum.imag], dim=-2)  # [Re Q; Im Q]
            middle = _max_norm(f.idft_w) * _max_norm(stacked)
        # A hair of slack for the float64 SVDs themselves (relative error ~1e-15 per factor).
        return outer * middle * (1 + 1e-12)

    def extra_repr(self) -> str:
        c = self.blocks.shape[-1]
        return f"{c}, input_size={self.input_size}, pad={self.pad}"


class Sandwich2d(nn.Module):
    """``y = outer(Ψ·ReLU(inner(x)))``: the exported sandwich layer (Wang & Manchester, 2023).

    ``inner`` is ``x ↦ √2·Ψ⁻¹B x + b``, ``scale`` the diagonal of ``Ψ`` (per channel, > 0) and
    ``outer`` is ``h ↦ √2·Aᴴh``; ``[A B]`` has orthonormal rows per frequency. Both maps are 1×1
    :class:`CircularConv2d` (``outer`` without bias) or both :class:`FourierConv2d` without padding
    on the same stored DFT matrices.

    Args:
        inner: the map before the ReLU (carries the bias).
        outer: the map after the scaling (no bias).
        scale: ``(c,)`` positive diagonal of ``Ψ``.

    Raises:
        ValueError: mixed or padded forms, a bias on ``outer``.
    """

    def __init__(self, inner: nn.Module, outer: nn.Module, scale: torch.Tensor) -> None:
        super().__init__()
        kinds = (type(inner), type(outer))
        if kinds not in ((CircularConv2d, CircularConv2d), (FourierConv2d, FourierConv2d)):
            raise ValueError(f"inner and outer must both be 1x1 CircularConv2d or both "
                             f"FourierConv2d, got {kinds[0].__name__}, {kinds[1].__name__}")
        if isinstance(inner, CircularConv2d) and (
            inner.weight.shape[-1] != 1 or outer.weight.shape[-1] != 1
        ):
            raise ValueError("CircularConv2d parts of a Sandwich2d must be 1x1")
        if isinstance(inner, FourierConv2d) and (
            inner.pad or outer.pad or inner.size != outer.size
        ):
            raise ValueError("FourierConv2d parts of a Sandwich2d must be unpadded, one size")
        if outer.bias is not None:
            raise ValueError("the outer map of a Sandwich2d has no bias")
        self.inner, self.outer = inner, outer
        self.register_buffer("scale", scale.detach().float().reshape(1, -1, 1, 1).clone())
        self.input_size = getattr(inner, "input_size", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(F.relu(self.inner(x)) * self.scale)

    @torch.no_grad()
    def lipschitz_upper_bound(self) -> float:
        """A guaranteed upper bound of the Lipschitz constant, from the stored float32 buffers.

        With ``inner = T_R·+b``, ``outer = T_O`` and ``Ψ = diag(scale)`` let ``𝒜 = T_Oᵀ/√2`` and
        ``ℬ = ΨT_R/√2``. For inputs ``x, x'`` the ReLU differences are ``D·T_R(x − x')`` with
        ``D`` diagonal in ``[0, 1]``, which commutes with ``Ψ``, so ``Δy = 2𝒜ᵀDℬΔx``. If
        ``𝒜𝒜ᵀ + ℬℬᵀ ⪯ λI`` then ``‖Δy‖ ≤ λ‖Δx‖`` (the sandwich theorem with ``⪯`` in place of
        ``=``: for ``Â = 𝒜/√λ``, ``B̂ = ℬ/√λ``, ``w = DB̂Δx``,
        ``‖Δx‖² − ‖2Âᵀw‖² ≥ ‖Δx − 2B̂ᵀw‖² + 4wᵀ(B̂Δx − w) ≥ 0``, the last term by the slope
        restriction of ReLU). ``λ = ‖[𝒜 ℬ]‖²`` will do. 1×1 maps: an exact SVD. Fourier maps:
        see :meth:`_fourier_bound`. Float32 *arithmetic* rounding is not covered (as
        everywhere; the radius' float slack is).

        Raises:
            ValueError: a non-positive scale.
        """
        psi = self.scale.double().flatten()
        if not (psi > 0).all():
            raise ValueError("Sandwich2d scale must be positive")
        if isinstance(self.inner, CircularConv2d):
            o = self.outer.weight.double()[:, :, 0, 0]  # (c, c): y = O h
            r = self.inner.weight.double()[:, :, 0, 0]  # (c, c_in): z = R x
            first = _max_norm(torch.cat([o.T, r * psi[:, None]], dim=1)) / math.sqrt(2)
            return first**2 * (1 + 1e-12)
        # Always sound as well: outer ∘ Ψ ∘ ReLU ∘ inner, norms multiplied.
        chained = (
            self.outer.lipschitz_upper_bound() * psi.max().item()
            * self.inner.lipschitz_upper_bound()
        )
        return min(chained, self._fourier_bound(psi))

    def _fourier_bound(self, psi: torch.Tensor) -> float:
        """``‖[𝒜 ℬ]‖²`` for two :class:`FourierConv2d` maps (``inf`` if a map is not structured).

        Each map is ``T = E·𝒬·F`` with ``F = dft_w·dft_h`` (per channel), ``E = dft_hᵀ·inverse_w``
        and ``𝒬`` the complex product by ``Q(f)`` per frequency. With ``D = F_R`` (the inner
        map's forward stages) and exact stages (``E = Fᵀ``, the same in both maps),
        ``√2·[𝒜 ℬ] = Dᵀ[𝒪ᴴ, Ψℛ](D ⊕ D)`` (``Ψ`` acts per channel, so it commutes with ``Dᵀ``),
        of norm ``≤ ‖D‖² max_f ‖[O(f)ᴴ, ΨR(f)]‖``. Stored stages that differ add
        ``Δ_a 𝒪 E_Oᵀ + Dᵀ𝒪ᵀΔ_b`` and ``ΨΔ_cℛD`` with ``Δ_a = F_Oᵀ − Dᵀ``, ``Δ_b = E_Oᵀ − D``,
        ``Δ_c = E_R − Dᵀ``, each bounded stage by stage (a composition's difference is a sum of
        differences of one stage at a time), so a mismatch costs a little, never soundness.
        """
        fi, fo = self.inner.stage_factors(), self.outer.stage_factors()
        if fi.inverse_w is None or fo.inverse_w is None:
            return math.inf
        n = _max_norm
        a_i, a_o, g_i, g_o = fi.dft_h, fo.dft_h, fi.dft_w, fo.dft_w
        d = n(a_i) * n(g_i)
        o_norm, r_norm = n(fo.spectrum), n(fi.spectrum)
        m = torch.cat([fo.spectrum.conj().transpose(-1, -2), fi.spectrum * psi[:, None]], dim=-1)
        first = n(a_i) ** 2 * n(g_i) ** 2 * n(m)
        delta_a = n(g_o - g_i) * n(a_o) + n(g_i) * n(a_o - a_i)
        delta_b = n(fo.inverse_w.T - g_i) * n(a_o) + n(g_i) * n(a_o - a_i)
        delta_c = n(a_i) * n(fi.inverse_w - g_i.T)
        e_o = n(a_o) * n(fo.inverse_w)
        second = (
            delta_a * o_norm * e_o + d * o_norm * delta_b + psi.max().item() * delta_c * r_norm * d
        )
        return ((first + second) / math.sqrt(2)) ** 2 * (1 + 1e-12)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}, input_size={self.input_size}"
