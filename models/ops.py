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


def spectral_norm_upper_bound(w: torch.Tensor) -> torch.Tensor:
    """A cheap guaranteed upper bound of the spectral norm of the last two dims, ``(..., 1, 1)``.

    ``‖W‖₂² = ‖WᵀW‖₂ <= ‖WᵀW‖_∞`` (largest absolute row sum of the Gram), which is tight when the
    Gram is diagonally dominant (near-orthogonal ``W``: the case Björck meets after a few training
    steps); the Frobenius norm is the fallback when that is looser.
    """
    gram = w.transpose(-1, -2).conj() @ w
    row_sum = gram.abs().sum(dim=-1).amax(dim=-1)[..., None, None]
    fro = torch.linalg.matrix_norm(w, ord="fro", keepdim=True)
    return torch.minimum(row_sum.sqrt(), fro)


def bjorck(w: torch.Tensor, iters: int = 20, beta: float = 0.5, order: int = 1) -> torch.Tensor:
    """Björck–Bowie orthonormalization of the last two dims (Björck & Bowie, 1971).

    Converges to the orthogonal polar factor of ``W`` when every singular value of the start lies
    in ``(0, √3)``. We pre-scale by :func:`spectral_norm_upper_bound` (so ``σ_max <= 1``) rather
    than by the Frobenius norm: for a near-orthogonal ``c × c`` matrix the Frobenius scaling starts
    every singular value at ``≈ 1/√c`` and wastes most of the iterations growing them back.
    The scale is detached: the fixed point does not depend on it. Iteration (order 1):
    ``W ← (1+β) W − β W WᵀW``.

    The iterations run as one autograd node (:class:`_BjorckIterations`): the same iterates and
    the same gradient as differentiating the loop, with two batched products per step forward and
    four backward instead of a graph of ~10 small nodes per step (the training-step cost of BCOP
    and AOC on small matrices is mostly that per-node overhead).

    ``iters`` is a cap: the loop stops once converged to the dtype's precision. When every
    ``|WᵀW − I|`` entry is at most ``√eps`` the step is taken and the loop ends: its result is
    within ``~0.75·eps`` of orthogonal, where the remaining steps would only add rounding (a
    singular value ``1 − δ`` becomes ``1 − 1.5δ² + O(δ³)``). The gradient is the same up to the same
    order: at the fixed point one step's Jacobian (``β = ½``) is the projection
    ``W·A ↦ W·skew(A)``, so further steps repeat a projection already applied. The test is one
    reduction (and on a GPU a device sync); it runs at the first step and then at the step a
    scalar model of the iteration predicts convergence for the deviation last seen, so a start far
    from orthogonal (every step needed) pays two or three tests, not one per step.

    Raises:
        ValueError: for ``order != 1``.
    """
    if order != 1:
        raise ValueError(f"only order 1 Björck is implemented, got order={order}")
    scale = spectral_norm_upper_bound(w.detach()).clamp_min(1e-12)
    w = w / scale
    if iters < 1:
        return w
    batch = w.shape[:-2]
    flat = w.reshape(-1, *w.shape[-2:])  # (N, c, r): bmm needs exactly one batch dim
    return _BjorckIterations.apply(flat, iters, beta).reshape(*batch, *w.shape[-2:])


def _bjorck_steps_to(gap: float, tol: float, beta: float, cap: int = 64) -> int:
    """Steps (at least 1) until a Gram deviation ``gap`` is predicted to fall to ``tol``.

    The scalar model of one step on an eigenvalue ``λ`` of ``WᵀW``: ``λ ← λ((1+β) − βλ)²``,
    started at ``λ = 1 − gap`` (the largest entry of ``|WᵀW − I|`` is at most ``1 − λ_min``).
    Only when the loop next tests convergence depends on it: a late test runs more steps of the
    fixed loop, an early one costs one reduction.
    """
    lam, steps = max(1.0 - gap, 1e-12), 1
    while steps < cap:
        lam *= (1 + beta - beta * lam) ** 2
        if 1.0 - lam <= tol:
            break
        steps += 1
    return steps


class _BjorckIterations(torch.autograd.Function):
    """Up to ``iters`` steps ``W ← (1+β)W − βW·G``, ``G = WᵀW``, on ``(N, c, r)``, as one node.

    Backward of one step, for the incoming gradient ``D``: ``(1+β)D − βD·G − βW(M + Mᵀ)`` with
    ``M = WᵀD`` (the derivative of ``W ↦ W WᵀW`` is ``dW·G + W·dWᵀW + W Wᵀ·dW``). The iterates
    ``W`` and Grams ``G`` of every step are saved (``iters`` small matrices each).
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, iters: int, beta: float) -> torch.Tensor:
        saved = []
        tol = torch.finfo(w.dtype).eps ** 0.5
        eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
        check = 0  # the next step whose Gram is tested
        for i in range(iters):
            gram = torch.bmm(w.transpose(-1, -2), w)
            saved += [w, gram]
            converged = False
            if i == check:
                gap = float((gram - eye).abs().amax())
                converged = gap <= tol
                check = i + _bjorck_steps_to(gap, tol, beta)
            w = torch.baddbmm(w, w, gram, beta=1 + beta, alpha=-beta)
            if converged:
                break
        ctx.save_for_backward(*saved)
        ctx.beta = beta
        return w

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        saved, beta = ctx.saved_tensors, ctx.beta
        grad = grad.contiguous()
        for i in range(len(saved) - 2, -1, -2):
            w, gram = saved[i], saved[i + 1]
            m = torch.bmm(w.transpose(-1, -2), grad)
            sym = m + m.transpose(-1, -2)
            out = torch.baddbmm(grad, grad, gram, beta=1 + beta, alpha=-beta)
            grad = torch.baddbmm(out, w, sym, alpha=-beta)
        return grad, None, None


def conv_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the memory layout convolutions train fastest in: ``channels_last`` on CPU.

    oneDNN (PyTorch's CPU convolution) computes in a channels-innermost layout; given NCHW
    tensors it reorders every operand on every call, and its weight gradient takes a slower path.
    With ``channels_last`` operands we measured, batch 64, 32 channels, 16×16, one thread: forward
    1.2×, weight gradient about 2× faster. Elsewhere (CUDA) ``x`` is returned as it is: not
    measured there. The values are the same; only the strides change (``x`` itself when it
    already has that layout), and the convolutions' outputs keep the layout.
    """
    return x.contiguous(memory_format=torch.channels_last) if _channels_last(x) else x


def _channels_last(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"


def circular_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Stride-1 convolution after circular padding by ``k // 2`` (same size), for training.

    The same map as :class:`models.plain.CircularConv2d` (equal up to rounding), faster to train:
    the padded input is written once into a fresh buffer in :func:`conv_layout`'s layout (on CPU
    ``channels_last``, so the pad and the layout change are one copy), and the output keeps that
    layout (an ordinary strided tensor; ``.contiguous()`` gives NCHW memory where one needs it).

    Args:
        x: ``(B, C, H, W)``, ``H, W >= k // 2``.
        weight: ``(c_out, C, k, k)``, odd ``k``.
        bias: ``(c_out,)`` or None.

    Returns:
        ``(B, c_out, H, W)``.
    """
    p = weight.shape[-1] // 2
    b, c, h, w = x.shape
    if p == 0:
        return F.conv2d(conv_layout(x), weight, bias)
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    out = torch.empty(
        (b, c, h + 2 * p, w + 2 * p), dtype=x.dtype, device=x.device, memory_format=fmt
    )
    out[..., p:-p, p:-p] = x
    out[..., :p, p:-p] = x[..., -p:, :]
    out[..., -p:, p:-p] = x[..., :p, :]
    out[..., :p] = out[..., -2 * p : -p]  # the column wrap, corners included
    out[..., -p:] = out[..., p : 2 * p]
    return F.conv2d(out, weight, bias)


def residual_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor
) -> torch.Tensor:
    """``x − Kᵀ(scale ⊙ ReLU(Kx + b))``, zero padding: CPL's and SLL's map in training form.

    The same map as :class:`models.plain.ResidualConv2d` (equal up to rounding), arranged for a
    cheaper training step: the scale goes into the transposed convolution's kernel
    (``Kᵀ diag(s) = (diag(s) K)ᵀ``, a ``c × c × k × k`` product instead of one pass over the
    activations forward and two backward); the difference is written as a sum with ``−diag(s) K``
    (the backward of a sum hands the gradient on, that of a difference negates it); the ReLU
    runs in place on the convolution's output (whose backward does not need it); and ``x`` goes
    through :func:`conv_layout`.

    Args:
        x: ``(B, c, H, W)``.
        weight: ``(c_inner, c, k, k)`` kernel ``K``, odd ``k``.
        bias: ``(c_inner,)`` or None.
        scale: ``(c_inner,)`` or a scalar tensor, per inner channel.

    Returns:
        ``(B, c, H, W)``.
    """
    p = weight.shape[-1] // 2
    x = conv_layout(x)
    h = F.conv2d(x, weight, bias, padding=p).relu_()
    outer = weight * scale.reshape(-1, 1, 1, 1).neg()
    return x + F.conv_transpose2d(h, outer, padding=p)


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


def block_reflector(v: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BRO's ``I − 2V(VᴴV + δI)⁻¹Vᴴ`` for tall ``V`` (``(..., c, r)``, real or complex).

    With ``δ = 0`` and ``V`` of full column rank this is the block reflector through the span of
    ``V``: Hermitian, orthogonal, eigenvalues ``−1`` (``r`` times) and ``+1``. The regularizer
    ``δ = eps · mean(diag VᴴV) + tiny`` (relative, as the BRONet code, plus a floor so that a zero
    ``V`` gives ``I`` instead of a singular solve) moves the eigenvalue ``−1`` of a direction with
    singular value ``σ`` to ``1 − 2σ²/(σ² + δ) ∈ (−1, 1]``: the result is Hermitian with spectrum
    in ``[−1, 1]``, so its norm is at most 1 for *any* ``V``, orthogonal up to ``δ/σ²``.
    """
    eye_r = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)
    eye_c = torch.eye(v.shape[-2], dtype=v.dtype, device=v.device)
    vh = v.transpose(-1, -2).conj()
    gram = vh @ v
    scale = gram.diagonal(dim1=-2, dim2=-1).real.mean(dim=-1)[..., None, None]
    delta = eps * scale + torch.finfo(scale.dtype).tiny ** 0.5
    return eye_c - 2 * v @ torch.linalg.solve(gram + delta * eye_r, vh)


def skew(w: torch.Tensor) -> torch.Tensor:
    """Skew-(Hermitian) part ``W − Wᴴ`` of the last two dims (no 1/2, as in the Cayley paper)."""
    return w - w.transpose(-1, -2).conj()


def _phase(n: int, k: int, like: torch.Tensor, onesided: bool) -> torch.Tensor:
    """``E[f, s] = exp(2πi·f·(s − k//2)/n)`` for the frequencies ``f`` of an ``n``-point DFT."""
    freqs = torch.arange(n // 2 + 1 if onesided else n, dtype=torch.float64, device=like.device)
    shifts = torch.arange(k, dtype=torch.float64, device=like.device) - k // 2
    angle = 2 * torch.pi * torch.outer(freqs, shifts) / n
    complex_dtype = torch.complex128 if like.dtype == torch.float64 else torch.complex64
    return torch.polar(torch.ones_like(angle), angle).to(complex_dtype)


def circular_conv_spectrum(
    kernel: torch.Tensor, n: int, m: int | None = None, *, onesided: bool = False
) -> torch.Tensor:
    """Per-frequency matrices of a circular convolution on an ``n × m`` image.

    The convolution is the cross-correlation ``F.conv2d`` computes after circular padding
    ``k // 2``: ``y[p] = Σ_s K[s] x[p + s − k//2]`` (indices mod the image size), so with the DFT
    ``X(f) = Σ_p x[p] e^{−2πi f·p/n}`` it acts per frequency as ``Y(f) = K̂(f) X(f)`` with
    ``K̂(f) = Σ_s K[s] e^{2πi f·(s − k//2)/n}``. Kernels larger than the image are fine: taps
    whose shifts agree modulo the size add up, as they do in the padded convolution.

    Args:
        kernel: ``(c_out, c_in, kh, kw)`` real kernel (gradients flow through).
        n, m: image height and width (``m`` defaults to ``n``).
        onesided: keep only the frequencies ``0 … m//2`` of the last axis (the ``rfft2`` half;
            the others are the complex conjugates).

    Returns:
        ``(n, m or m//2+1, c_out, c_in)`` complex. The singular values of all these matrices
        together (full grid) are exactly those of the convolution operator.
    """
    m = n if m is None else m
    _, _, kh, kw = kernel.shape
    eh = _phase(n, kh, kernel, onesided=False)  # (n, kh)
    ew = _phase(m, kw, kernel, onesided=onesided)  # (m or m//2+1, kw)
    k = kernel.to(eh.dtype)
    return torch.einsum("fs,gt,oist->fgoi", eh, ew, k)


def circular_conv_singular_values(
    kernel: torch.Tensor, n: int, m: int | None = None
) -> torch.Tensor:
    """All singular values of the circular convolution on ``n × m`` (exact up to rounding)."""
    return torch.linalg.svdvals(circular_conv_spectrum(kernel, n, m))


def spectrum_to_circular_kernel(spectrum: torch.Tensor, n: int) -> torch.Tensor:
    """The spatial kernel of the circular convolution with one-sided ``spectrum`` on ``n × n``.

    Inverse of :func:`circular_conv_spectrum` (``onesided=True``): returns a real
    ``(c_out, c_in, k, k)`` kernel, ``k = n`` for odd ``n`` and ``n + 1`` for even ``n`` (odd, so
    the usual padding ``k // 2`` applies; the shift ``n/2`` has two taps modulo ``n`` and we use
    the first, leaving the last row and column zero).

    Args:
        spectrum: ``(n, n//2+1, c_out, c_in)`` complex, conjugate-symmetric (a real operator).
        n: image size.
    """
    if spectrum.shape[:2] != (n, n // 2 + 1):
        raise ValueError(f"spectrum of shape {tuple(spectrum.shape)} is not one-sided for n={n}")
    # K̂(f) = Σ_t g[t] e^{2πi f·t/n}  =>  g = irfft2(conj K̂) (real taps at shifts t mod n).
    g = torch.fft.irfft2(spectrum.conj().permute(2, 3, 0, 1), s=(n, n))  # (c_out, c_in, n, n)
    k = n if n % 2 else n + 1
    kernel = g.new_zeros(*g.shape[:2], k, k)
    # Tap s of the padded convolution acts at shift s − k//2, i.e. g[(s − k//2) mod n].
    idx = (torch.arange(n, device=g.device) - k // 2) % n
    kernel[..., :n, :n] = g[..., idx, :][..., idx]
    return kernel


def apply_spectrum(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The circular convolution with one-sided spectrum ``q``: ``irfft2(Q(f) · rfft2(x)(f))``.

    Args:
        x: ``(B, c_in, n, m)`` real.
        q: ``(n, m//2 + 1, c_out, c_in)`` complex (e.g.
            ``circular_conv_spectrum(..., onesided=True)``).

    Returns:
        ``(B, c_out, n, m)`` real.
    """
    n, m = x.shape[-2:]
    xf = torch.fft.rfft2(x)  # (B, c_in, n, m//2+1)
    yf = torch.einsum("hwoi,bihw->bohw", q, xf)
    return torch.fft.irfft2(yf, s=(n, m))
