"""Plain inference modules that the method layers export to.

Every exported network is built from these, ``nn.Conv2d`` (zero padding), ``nn.Linear`` and the
blocks in :mod:`models.blocks`. They hold materialized weights as buffers (float32), contain no
parametrization, export to ONNX with standard operators, and are what :mod:`certify.audit`
bounds, one type at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def circular_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    """Circular padding by ``p`` on H and W, written with slices so every exporter maps it."""
    if p == 0:
        return x
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
        p = self.weight.shape[-1] // 2
        h = F.relu(F.conv2d(x, self.weight, self.bias, padding=p)) * self.scale
        return x - F.conv_transpose2d(h, self.weight, padding=p)


class ConvExponential(nn.Module):
    """Truncated convolution exponential ``y = Σ_{i=0}^{T} Lⁱx / i! + b`` (SOC at inference).

    ``L`` is a zero-padded convolution with a skew-symmetric kernel (``L = −flip(Lᵀ)``), so the
    operator is exactly skew-symmetric and ``exp(L)`` orthogonal; the truncation at ``terms``
    makes it approximately so. Evaluated in Horner form ``z ← x + L z / i`` for ``i = T … 1``.
    """

    def __init__(self, kernel: torch.Tensor, terms: int, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.terms = int(terms)
        self.register_buffer("kernel", kernel.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.kernel.shape[-1] // 2
        z = x
        for i in range(self.terms, 0, -1):
            z = x + F.conv2d(z, self.kernel, padding=p) / i
        if self.bias is not None:
            z = z + self.bias.view(1, -1, 1, 1)
        return z

    def extra_repr(self) -> str:
        return f"terms={self.terms}"


def _real_dft_matrices(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal real DFT matrices for :class:`FourierConv2d`, float64.

    Returns ``(dft_w, dft_h)``:

    - ``dft_w`` ``(n, 2r)``, ``r = n//2 + 1``: ``x @ dft_w`` gives the real and the imaginary parts
      of the one-sided DFT of each row, each bin scaled by ``√(w_k / n)`` with ``w_k = 1`` for the
      self-conjugate bins (0, and ``n/2`` for even ``n``) and 2 otherwise. With that weighting the
      map is an isometry of ℝⁿ (the imaginary parts of the self-conjugate bins are identically 0).
    - ``dft_h`` ``(2n, 2n)``: the unitary DFT ``(C − iS)/√n`` (C, S symmetric) written as a real
      matrix ``[[C, −S], [S, C]] / √n`` that right-multiplies a row ``[real | imag]``: orthogonal.
    """
    r = n // 2 + 1
    t = torch.arange(n, dtype=torch.float64)
    angle_w = 2 * torch.pi * torch.outer(t, torch.arange(r, dtype=torch.float64)) / n  # (n, r)
    weight = torch.full((r,), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if n % 2 == 0:
        weight[-1] = 1.0
    scale = (weight / n).sqrt()
    sin_w = torch.sin(angle_w)
    sin_w[:, 0] = 0.0  # exactly zero, not sin(~0) rounding noise
    if n % 2 == 0:
        sin_w[:, -1] = 0.0
    dft_w = torch.cat([torch.cos(angle_w) * scale, -sin_w * scale], dim=1)  # (n, 2r)
    angle_h = 2 * torch.pi * torch.outer(t, t) / n
    c, s = torch.cos(angle_h) / n**0.5, torch.sin(angle_h) / n**0.5
    dft_h = torch.cat([torch.cat([c, -s], dim=1), torch.cat([s, c], dim=1)], dim=0)  # (2n, 2n)
    return dft_w, dft_h


class FourierConv2d(nn.Module):
    """A circular convolution applied per frequency, with the DFTs written as real matmuls.

    This is how the FFT methods (Cayley, LOT) go to ONNX, which has no complex FFT: for an input
    of the fixed size ``n`` (after the optional zero padding ``pad``)::

        X = rDFT_W(x)              x @ dft_w           (real | imag of the one-sided row DFT)
        X = DFT_H(X)               [Re | Im] @ dft_h   (unitary column DFT, as a real matrix)
        Y(f) = Q(f) X(f)           one real 2c × 2c block [[Re Q, −Im Q], [Im Q, Re Q]] per f
        y = rDFT_W⁻¹(DFT_H⁻¹(Y))   the transposes of the same two matrices

    Every DFT stage is one large GEMM against a constant 2-D matrix (leading dims flattened),
    with transposes in between: what ONNX Runtime runs fastest (a constant on the *left* of a
    batched MatMul becomes thousands of tiny GEMMs).

    Both DFT stages are isometries (orthonormal scaling, see :func:`_real_dft_matrices`), so the
    operator norm is ``max_f ‖Q(f)‖₂`` and :meth:`lipschitz_upper_bound` is tight. Cost per image
    and channel ``O(n³)`` for the DFTs plus ``O(n² c)`` for the blocks, against ``O(n⁴ c)`` for
    the equivalent spatial convolution with an ``n × n`` kernel.

    With ``pad > 0`` (LOT) the input is zero-padded by ``pad``, convolved circularly on
    ``n + 2·pad`` and cropped back: padding is an isometry and cropping a projection, so the
    bound of the circular part still holds.

    Args:
        spectrum: ``(N, N//2 + 1, c_out, c_in)`` complex one-sided per-frequency matrices of the
            circular convolution on ``N × N`` (as :func:`models.ops.circular_conv_spectrum`
            returns with ``onesided=True``), ``N = input_size + 2·pad``. Use complex128 for an
            exact export; it is stored as float32.
        bias: ``(c_out,)`` or None.
        pad: zero padding before and crop after the circular convolution.

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
        q = spectrum.detach().to(torch.complex128)
        # Real form of each complex block, transposed for ``z @ blocks`` with z = [Re x | Im x];
        # frequencies ordered (kw, kh), the layout the forward pass reaches them in.
        real = torch.cat(
            [torch.cat([q.real, -q.imag], dim=-1), torch.cat([q.imag, q.real], dim=-1)], dim=-2
        )  # (N, r, 2c, 2c)
        blocks = real.transpose(0, 1).reshape(size * half, 2 * c_out, 2 * c_in).transpose(-1, -2)
        dft_w, dft_h = _real_dft_matrices(size)
        self.register_buffer("dft_w", dft_w.float())
        self.register_buffer("dft_h", dft_h.float())
        self.register_buffer("blocks", blocks.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, n, n) -> (B, C, n, n)
        # The check is Python-side: skip it while tracing (the exported graph has a fixed size).
        if not torch.jit.is_tracing() and x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"FourierConv2d was exported for {self.input_size}x{self.input_size} inputs, "
                f"got {tuple(x.shape[-2:])}"
            )
        p, n, r = self.pad, self.size, self.size // 2 + 1
        if p:
            x = F.pad(x, (p, p, p, p))
        b, c = x.shape[0], x.shape[1]
        z = x @ self.dft_w  # (B, C, N, 2r): rows h, [Re | Im] over kw
        z = z.reshape(b, c, n, 2, r).permute(0, 1, 4, 3, 2).reshape(b, c, r, 2 * n)
        z = z @ self.dft_h  # (B, C, r, 2N): per kw, [Re | Im] over kh
        # One channel-mixing block per frequency: (F, B, 2C) @ (F, 2C, 2C), F = (kw, kh).
        z = z.reshape(b, c, r, 2, n).permute(2, 4, 0, 3, 1).reshape(r * n, b, 2 * c)
        z = torch.matmul(z, self.blocks)
        z = z.reshape(r, n, b, 2, c).permute(2, 4, 0, 3, 1).reshape(b, c, r, 2 * n)
        z = z @ self.dft_h.transpose(0, 1)  # inverse column DFT
        z = z.reshape(b, c, r, 2, n).permute(0, 1, 4, 3, 2).reshape(b, c, n, 2 * r)
        y = z @ self.dft_w.transpose(0, 1)  # (B, C, N, N)
        if p:
            y = y[..., p:-p, p:-p]
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    @torch.no_grad()
    def lipschitz_upper_bound(self) -> float:
        """A guaranteed upper bound of the operator norm of the map this module computes.

        The map is ``crop ∘ Dᵀ ∘ blockdiag(Q) ∘ D ∘ pad`` with ``D`` built from the *stored*
        float32 DFT matrices, so ``‖·‖ <= ‖dft_w‖² · ‖dft_h‖² · max_f ‖Q(f)‖`` (padding and
        cropping have norm <= 1, the bias does not change the Lipschitz constant). Each factor is
        an exact largest singular value of the stored float32 matrices, computed in float64.
        Float32 *arithmetic* rounding in the forward pass is not covered (it is not a linear map).
        """
        dft_w = torch.linalg.matrix_norm(self.dft_w.double(), ord=2).item()
        dft_h = torch.linalg.matrix_norm(self.dft_h.double(), ord=2).item()
        blocks = torch.linalg.matrix_norm(self.blocks.double(), ord=2).max().item()
        # A hair of slack for the float64 SVD itself (relative error ~1e-15 per factor).
        return dft_w**2 * dft_h**2 * blocks * (1 + 1e-12)

    def extra_repr(self) -> str:
        c = self.blocks.shape[-1] // 2
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
        restriction of ReLU). ``λ = ‖[𝒜 ℬ]‖²`` will do. In the DFT form ``T = Dᵀ·blocks·D``
        (stored DFT ``D``, which commutes with the channel scaling),
        ``‖[𝒜 ℬ]‖ ≤ ‖D‖² max_f ‖[O(f)ᵀ, ΨR(f)]‖ / √2``, each factor an exact float64 SVD of
        the stored matrices. Exact weights give ``λ = 1``; float32 storage moves it by ~1e-6.
        Should the two maps store different DFT matrices (``D_i = D_o + E``), ``ℬ`` is compared
        with ``ΨD_oᵀR̂D_o/√2``: the difference ``Ψ(EᵀR̂D_i + D_oᵀR̂E)/√2`` adds
        ``max ψ · max_f ‖R(f)‖ · ‖E‖ (‖D_i‖ + ‖D_o‖) / √2`` to ``‖[𝒜 ℬ]‖``, with
        ``‖E‖ ≤ ‖Δdft_h‖‖dft_w,i‖ + ‖dft_h,o‖‖Δdft_w‖`` (the DFT is the two stages composed).
        Float32 *arithmetic* rounding in the forward pass is not covered (as everywhere).

        Raises:
            ValueError: a non-positive scale.
        """
        psi = self.scale.double().flatten()
        if not (psi > 0).all():
            raise ValueError("Sandwich2d scale must be positive")

        def norm(t: torch.Tensor) -> float:
            return torch.linalg.matrix_norm(t.double(), ord=2).max().item()

        if isinstance(self.inner, CircularConv2d):
            o = self.outer.weight.double()[:, :, 0, 0]  # (c, c): y = O h
            r = self.inner.weight.double()[:, :, 0, 0]  # (c, c_in): z = R x
            first = norm(torch.cat([o.T, r * psi[:, None]], dim=1)) / math.sqrt(2)
            return first**2 * (1 + 1e-12)
        # blocks[f] is the transpose of the operator's real 2c × 2c matrix at frequency f.
        inner, outer = self.inner, self.outer
        s = torch.cat([psi, psi])[None, :, None]
        r = inner.blocks.double().transpose(-1, -2)  # R(f)
        m = torch.cat([outer.blocks.double(), r * s], dim=-1)  # [O(f)ᵀ, ΨR(f)]
        d_o = norm(outer.dft_w) * norm(outer.dft_h)
        d_i = norm(inner.dft_w) * norm(inner.dft_h)
        first = d_o**2 * norm(m) / math.sqrt(2)
        delta_h = norm(inner.dft_h.double() - outer.dft_h.double())
        delta_w = norm(inner.dft_w.double() - outer.dft_w.double())
        e = delta_h * norm(inner.dft_w) + norm(outer.dft_h) * delta_w
        second = psi.max().item() * norm(r) * e * (d_i + d_o) / math.sqrt(2)
        return (first + second) ** 2 * (1 + 1e-12)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}, input_size={self.input_size}"
