"""Shared maths of the methods: Gram kernels, power iteration, Björck, Newton–Schulz, Cayley, FFT.

One function per idea; the layers call these rather than re-deriving them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kernel_gram(kernel: torch.Tensor) -> torch.Tensor:
    """Gram operator ``KᵀK`` of a convolution, as a kernel over the *input* channels.

    For ``kernel`` of shape ``(c_out, c_in, k, k)`` returns ``G`` of shape
    ``(c_in, c_in, 2k-1, 2k-1)`` with ``G[a, b, s] = Σ_o Σ_p K[o, a, p + s] K[o, b, p]``: the
    convolution of the transposed kernel with itself. This is the matrix ``KᵀK`` of the
    convolution on an infinite (or large enough circular) image, one block per shift.
    """
    k = kernel.shape[-1]
    kt = kernel.transpose(0, 1)  # (c_in, c_out, k, k)
    return F.conv2d(kt, kt, padding=k - 1)


def aol_rescaling(kernel: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """AOL's diagonal ``d_i = (Σ_j Σ_shifts |KᵀK|_ij + eps)^(-1/2)`` (Prach & Lampert 2022).

    ``kernel * d[None, :, None, None]`` has operator norm <= 1 for any padding (Theorem 1 of the
    AOL paper: the sum of absolute Gram entries of a row dominates the Gram's spectral norm).
    """
    gram = kernel_gram(kernel)
    return (gram.abs().sum(dim=(1, 2, 3)) + eps).rsqrt()


def power_iteration(
    apply: callable,
    apply_t: callable,
    u: torch.Tensor,
    steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Power iteration on ``AᵀA``; returns ``(sigma_estimate, u)`` with ``u`` normalized.

    The estimate is a *lower* bound on ``‖A‖₂`` (up to rounding): never use it as a certificate.
    """
    for _ in range(steps):
        u = apply_t(apply(u))
        u = u / u.norm().clamp_min(1e-12)
    sigma = apply(u).norm()
    return sigma, u


def bjorck(w: torch.Tensor, iters: int = 20, beta: float = 0.5, order: int = 1) -> torch.Tensor:
    """Björck–Bowie orthonormalization of the last two dims (Björck & Bowie, 1971).

    Pre-scales by an upper bound of the spectral norm (sqrt of ‖WᵀW‖_1 · ‖WᵀW‖_∞ style bound via
    the Frobenius norm) so the iteration converges; ``W ← (1+β) W − β W WᵀW`` (order 1).
    """
    if order != 1:
        raise ValueError(f"only order 1 Björck is implemented, got order={order}")
    scale = torch.linalg.matrix_norm(w, ord="fro", keepdim=True).clamp_min(1e-12)
    w = w / scale
    for _ in range(iters):
        w = (1 + beta) * w - beta * w @ (w.transpose(-1, -2) @ w)
    return w


def newton_schulz_inverse_sqrt(s: torch.Tensor, iters: int = 10) -> torch.Tensor:
    """Coupled Newton–Schulz iteration for ``S^(-1/2)`` of Hermitian PSD ``S`` with ‖S‖ <= 1.

    ``Y = S, Z = I; T = (3I − ZY)/2; Y ← YT; Z ← TZ``; ``Z`` converges to ``S^(-1/2)``.
    Works on real or complex batches of square matrices (last two dims).
    """
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device).expand_as(s)
    y, z = s, eye
    for _ in range(iters):
        t = 0.5 * (3 * eye - z @ y)
        y, z = y @ t, t @ z
    return z


def cayley(a: torch.Tensor) -> torch.Tensor:
    """Cayley transform ``(I + A)⁻¹(I − A)`` of skew(-Hermitian) ``A`` (last two dims)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    return torch.linalg.solve(eye + a, eye - a)


def skew(w: torch.Tensor) -> torch.Tensor:
    """Skew-(Hermitian) part ``W − Wᴴ`` of the last two dims (no 1/2, as in the Cayley paper)."""
    return w - w.transpose(-1, -2).conj()


def circular_conv_spectrum(kernel: torch.Tensor, n: int, m: int | None = None) -> torch.Tensor:
    """Per-frequency matrices of a circular convolution on an ``n × m`` image.

    Returns ``(n, m, c_out, c_in)`` complex: the 2-D DFT of the kernel, centred so that the
    kernel's middle tap acts at zero shift (cross-correlation, as ``F.conv2d`` computes). The
    singular values of all these matrices together are exactly those of the convolution operator.
    """
    m = n if m is None else m
    c_out, c_in, kh, kw = kernel.shape
    if kh > n or kw > m:
        raise ValueError(f"kernel {kh}x{kw} larger than the image {n}x{m}")
    # Cross-correlation y[p] = Σ_s K[s] x[p + s - centre] is convolution with the flipped kernel.
    flipped = kernel.flip(-1, -2)
    padded = flipped.new_zeros(c_out, c_in, n, m)
    padded[..., :kh, :kw] = flipped
    padded = padded.roll(shifts=(-(kh // 2), -(kw // 2)), dims=(-2, -1))
    return torch.fft.fft2(padded).permute(2, 3, 0, 1)  # (n, m, c_out, c_in)


def circular_conv_singular_values(kernel: torch.Tensor, n: int, m: int | None = None) -> torch.Tensor:
    """All singular values of the circular convolution on ``n × m`` (exact up to rounding)."""
    return torch.linalg.svdvals(circular_conv_spectrum(kernel, n, m))
