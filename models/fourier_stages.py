"""The constant matrices of :class:`models.plain.FourierConv2d`, the export form of the FFT methods.

Pure functions of the circular size and the spectrum (float64 in, float64 out); the module stores
them as float32 and computes every bound from the stored values.
"""

from __future__ import annotations

import torch


def one_sided_spectrum_in_h(spectrum: torch.Tensor) -> torch.Tensor:
    """``(N, N//2+1, c, c)`` one-sided in W → ``(N//2+1, N, c, c)`` one-sided in H.

    A real convolution's matrices satisfy ``Q(−f) = conj(Q(f))``, so the missing
    ``Q(kh, kw)``, ``kw > N/2``, is ``conj(Q(−kh, N − kw))``.
    """
    size, half = spectrum.shape[:2]
    mirror_h = (-torch.arange(half)) % size
    mirrored = spectrum[mirror_h][:, size - torch.arange(half, size)].conj()
    return torch.cat([spectrum[:half], mirrored], dim=1)


def flush_tiny(t: torch.Tensor, rel: float = 1e-12) -> torch.Tensor:
    """``t`` with its entries below ``rel · max|t|`` set to 0 (e.g. float64 noise of exact zeros).

    Stored as float32 such entries are invisible beside the matrix's other entries (they change
    its norm by at most ``rel·√(numel)·max|t|``), but they reach float32's denormal range in the
    products, and denormal arithmetic is slow on x86: LOT S's exported file ran 1.5x slower at
    batch 256 in ONNX Runtime before this (docs/bench.md). Every bound is computed from the
    stored, flushed values, so the audit covers exactly what runs.
    """
    cut = rel * float(t.abs().max()) if t.numel() else 0.0
    return torch.where(t.abs() < cut, torch.zeros_like(t), t)


def fourier_stages(size: int, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three constant matrices of :class:`models.plain.FourierConv2d`, float64.

    ``N = size`` (circular size), ``n = N − 2·pad`` (input and output size), ``r = N//2 + 1``.
    Zero padding by ``pad`` and the crop back to ``n`` are folded in (only the columns, resp.
    rows, of the ``n`` kept pixels).

    - ``dft_h`` ``(2r, n)``, rows ``(kh, Re|Im)``: the one-sided DFT along H, each bin scaled by
      ``√(w_k/N)`` (``w_k = 1`` for the self-conjugate bins 0 and ``N/2``, else 2). Its columns
      are orthonormal (an isometry of real signals; the imaginary rows of self-conjugate bins
      are exactly 0). Its transpose is the inverse stage.
    - ``dft_w`` ``(2N, 2n)``, rows ``(kw, Re|Im)``, columns ``(Re|Im, w)``: the unitary DFT
      ``(C − iS)/√N`` along W written as a real matrix (orthogonal up to the crop).
    - ``idft_w`` ``(2n, 4N)``, rows ``(Re|Im, w)``, columns ``(kw, t, j)``: ``dft_wᵀ`` (the
      inverse DFT) after the complex product's combination. The blocks give
      ``P[t, j] = X_j Q_tᵀ`` (``X_0, X_1 = Re X, Im X``; ``Q_0, Q_1 = Re Q, Im Q``), and
      ``Re QX = P00 − P11``, ``Im QX = P10 + P01``: the columns of ``P00`` and ``P10`` are those
      of ``dft_wᵀ``, the columns of ``P11`` their negation and of ``P01`` a copy (exact in any
      precision, which :meth:`FourierConv2d.stage_factors` checks).
    """
    n, half = size - 2 * pad, size // 2 + 1
    kept = slice(pad, pad + n)
    t = torch.arange(size)

    def angle(k: torch.Tensor) -> torch.Tensor:  # 2π(k·t mod N)/N: exact symmetries
        return 2 * torch.pi * (torch.outer(k, t) % size).to(torch.float64) / size

    def exact_zeros(v: torch.Tensor) -> torch.Tensor:
        # cos and sin of multiples of π/2 come out as ±1e-16, not 0: every other value is at least
        # sin(2π/N) in magnitude, so snap those to the exact 0 (stray tiny entries would make
        # float32 products denormal, which slows ONNX Runtime by up to 1.5x on x86).
        return torch.where(v.abs() < 1e-9, torch.zeros_like(v), v)

    weight = torch.full((half,), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if size % 2 == 0:
        weight[-1] = 1.0
    scale = (weight / size).sqrt()[:, None]
    a = angle(torch.arange(half))
    cos, sin = exact_zeros(torch.cos(a)), exact_zeros(torch.sin(a))
    dft_h = torch.stack([cos * scale, -sin * scale], dim=1)  # (r, 2, N)
    dft_h = dft_h.reshape(2 * half, size)[:, kept]
    a = angle(t)
    c, s = exact_zeros(torch.cos(a)) / size**0.5, exact_zeros(torch.sin(a)) / size**0.5  # (k, w)
    dft_w = torch.stack([torch.stack([c, s], dim=1), torch.stack([-s, c], dim=1)], dim=1)
    dft_w = dft_w[..., kept].reshape(2 * size, 2 * n)  # (kw, Re|Im) x (Re|Im, w)
    inverse = dft_w.T.reshape(2 * n, size, 2)  # (Re|Im, w) x (kw, Re|Im of Y)
    idft_w = torch.stack(
        [torch.stack([inverse[..., 0], inverse[..., 1]], dim=-1),  # t=0: P00 → Re Y, P01 → Im Y
         torch.stack([inverse[..., 1], -inverse[..., 0]], dim=-1)],  # t=1: P10 → Im Y, P11 → −Re Y
        dim=-2,
    )  # (2n, N, t, j)
    return dft_h, dft_w, idft_w.reshape(2 * n, 4 * size)
