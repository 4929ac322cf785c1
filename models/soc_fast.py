"""Fast SOC training gradients: a custom autograd Function for the truncated conv exponential.

Singla & Feizi, "Improved techniques for deterministic l2 robustness", NeurIPS 2022,
arXiv:2211.08453 (fast gradient computation for SOC; code: ``singlasahil14/improved_l2_robustness``,
``skew_ortho_conv.py``, ``SOC_Function``).

The SOC layer computes ``y = p(L)x`` with ``p(t) = Σ_{i=0}^{T} tⁱ/i!`` by Horner's rule
(``z ← x + Lz/i`` for ``i = T … 1``), ``L`` a zero-padded convolution with a skew kernel, so the
operator is skew-symmetric (``Lᵀ = −L``) and ``p(L)ᵀ = p(−L)``. For a loss gradient ``g`` at ``y``:

- **input gradient**: ``p(L)ᵀg = p(−L)g``, exact in both modes below.
- **kernel gradient** of the truncated series, with ``wgrad(a, b)`` the weight gradient of a
  convolution (input ``a``, output gradient ``b``):
  ``∂⟨g, p(L)x⟩/∂L = Σ_{a+b ≤ T−1} wgrad(Lᵃx, (Lᵀ)ᵇg) / (a+b+1)!``.
  Its coefficient matrix ``1/(a+b+1)!`` (zero for ``a+b ≥ T``) is anti-triangular, hence of full
  rank ``T``: the exact gradient needs ``T`` weight-gradient convolutions, no identity removes them.

Modes (``grad_mode``):

- ``"exact"``: the gradients of the truncated series (equal to autograd through the Horner loop up
  to float rounding; tested to 1e-5 in float32). Same convolutions as autograd (``T`` forward,
  ``T`` fused input+weight backward calls); the saving is everything around them: the ``1/i``
  factors are folded into the (tiny) kernel instead of scaling activations, the ``+ x`` is in
  place, and the backward runs the Horner recurrence directly, so about ``3T`` activation-sized
  elementwise passes and allocations per step disappear. It does not need the kernel to be skew.
- ``"paper"``: the paper's method, **approximate in the kernel gradient**. Its code keeps only
  ``z = φ(L)x`` (``φ(t) = Σ_{k<T} tᵏ/(k+1)!``, so ``y = x + Lz``), runs the input gradient
  through ``p(−L)`` with ``w = φ(−L)g`` on the way, and takes the single weight gradient
  ``wgrad(φ(L)x, φ(−L)g)``. Expanded, that is the double sum above with ``1/((a+1)!(b+1)!)``
  for every ``a, b < T`` in place of ``1/(a+b+1)!`` for ``a+b < T``; in integral form the exact
  gradient of ``exp(L)`` is ``∫₀¹ wgrad(e^{sL}x, e^{(1−s)Lᵀ}g) ds`` (one line through the unit
  square), the paper's is the same integrand over the whole square. Terms with ``a + b ≤ 1``
  agree, so the relative error is second order in ``‖L‖`` (``≤ 0.7`` in SOC, 1 for 1×1 kernels):
  measured 5e-5 to 2e-2 on single layers and about 2e-2 on whole LipNets' weight gradients
  (cosine 0.9998; :mod:`bench.soc_fast`). The input gradient stays exact. Saves ``T − 1``
  weight-gradient convolutions and ``T − 1`` saved activations per layer: the paper's speed-up
  comes from this approximation. The Lipschitz guarantee does not depend on gradients; only what
  is learned can.

Measured on CPU (``docs/soc_fast.md``): training step ``"exact"`` ÷ autograd 0.94–1.03 (no gain
beyond noise), ``"paper"`` ÷ autograd 0.61–0.77.
Note: the paper's ``train_terms = 6`` means powers up to 5 (its code passes ``terms − 1``); here
``terms`` is the highest power.

The paper applies ``Lᵀ`` as a forward convolution with ``−L`` (valid only for skew kernels).
A transposed convolution is the same operator for *any* kernel and measured as fast on CPU
(190 vs 201 ms for ``T = 6``, 64 channels, 16×16, batch 64), so both modes use it: no skewness
check (a device sync on GPU) and no fallback path are needed, and a non-skew kernel still gets
exact input gradients. Both backwards are first order only (double backward raises).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

GRAD_MODES = ("exact", "paper")


def resolve_grad_mode(fast_grad: bool | str | None) -> str | None:
    """Map a layer's ``fast_grad`` option to a mode: ``False`` / None → None (plain autograd).

    Args:
        fast_grad: ``False``, ``True`` (= ``"exact"``), ``"exact"`` or ``"paper"``.

    Returns:
        ``None``, ``"exact"`` or ``"paper"``.

    Raises:
        ValueError: any other value (also ``0``/``1``: booleans only, to catch typos early).
    """
    if fast_grad is False or fast_grad is None:
        return None
    if fast_grad is True:
        return "exact"
    if isinstance(fast_grad, str) and fast_grad in GRAD_MODES:
        return fast_grad
    raise ValueError(
        f"fast_grad must be False, True or one of {', '.join(GRAD_MODES)}; got {fast_grad!r}"
    )


def is_skew_kernel(kernel: torch.Tensor) -> bool:
    """Whether ``flip(kernelᵀ) == −kernel`` exactly, i.e. the zero-padded conv is skew-symmetric."""
    return bool(torch.equal(kernel.transpose(0, 1).flip(-2, -1), -kernel))


def _conv_backward(
    grad_out: torch.Tensor,
    inp: torch.Tensor,
    kernel: torch.Tensor,
    pad: int,
    need_input: bool,
    need_weight: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(Kᵀ grad_out, wgrad(inp, grad_out))`` of ``conv2d(inp, K, padding=pad)`` in one call."""
    grad_in, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_out,
        inp,
        kernel,
        None,
        [1, 1],
        [pad, pad],
        [1, 1],
        False,
        [0, 0],
        1,
        [need_input, need_weight, False],
    )
    return grad_in, grad_w


class ConvExponentialFunction(torch.autograd.Function):
    """``y = c₀(1 + r₁L(1 + r₂L(⋯(1 + r_T L))))x`` (zero padding ``k // 2``), hand-written backward.

    Forward arguments: ``(x, kernel, ratios, grad_mode)`` with ``ratios = (c₀, r₁, …, r_T)`` (the
    ratio Horner form of :mod:`models.exp_series`; Taylor: ``c₀ = 1``, ``r_i = 1/i``); gradients
    for ``x`` and ``kernel``. ``"exact"`` saves the ``T`` Horner states (as autograd does),
    ``"paper"`` one tensor.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, kernel: torch.Tensor, ratios: tuple[float, ...], grad_mode: str
    ) -> torch.Tensor:
        p = kernel.shape[-1] // 2
        terms, scale = len(ratios) - 1, ratios[0]
        ctx.ratios, ctx.pad, ctx.grad_mode = ratios, p, grad_mode
        if grad_mode == "paper":
            z = x  # Horner down to i = 2 leaves z = φ(L)x; then y = c₀(x + r₁Lz).
            for i in range(terms, 1, -1):
                z = F.conv2d(z, kernel * ratios[i], padding=p).add_(x)
            if terms >= 1:
                y = F.conv2d(z, kernel * ratios[1], padding=p).add_(x)
            else:
                y = x.clone()
            ctx.save_for_backward(z, kernel)
            return y.mul_(scale) if scale != 1 else y
        states = []  # states[i - 1]: the input of step i (z_{T+1} = x, …, z_2)
        z = x
        for i in range(terms, 0, -1):
            states.append(z)
            # r_i on the tiny kernel, + x in place
            z = F.conv2d(z, kernel * ratios[i], padding=p).add_(x)
        states.reverse()
        ctx.save_for_backward(kernel, *states)
        y = z if terms >= 1 else x.clone()
        return y.mul_(scale) if scale != 1 else y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        # The forward ran with autocast off; keep the backward in the same (saved) dtype too.
        with torch.autocast(grad_out.device.type, enabled=False):
            return ConvExponentialFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: torch.Tensor):
        ratios, p = ctx.ratios, ctx.pad
        terms, scale = len(ratios) - 1, ratios[0]
        need_x, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_out = grad_out.contiguous()
        if scale != 1:
            grad_out = grad_out * scale
        if ctx.grad_mode == "paper":
            z, kernel = ctx.saved_tensors
            if terms == 0:
                return grad_out, (torch.zeros_like(kernel) if need_k else None), None, None
            w = grad_out  # w = φ(Lᵀ)g by the same Horner recurrence
            for i in range(terms, 1, -1):
                w = F.conv_transpose2d(w, kernel * ratios[i], padding=p).add_(grad_out)
            grad_x, grad_k = _conv_backward(w, z, kernel * ratios[1], p, need_x, need_k)
            if grad_k is not None and ratios[1] != 1:
                grad_k = grad_k.mul_(ratios[1])
            if grad_x is not None:
                grad_x = grad_x.add_(grad_out)  # p(Lᵀ)g = c₀(g + r₁Lᵀφ(Lᵀ)g)
            return grad_x, grad_k, None, None
        kernel, *states = ctx.saved_tensors
        # Step i maps its input z_{i+1} to z_i = x + r_i L z_{i+1}; h is the gradient at z_i.
        h = grad_out
        grad_x = grad_out.clone() if need_x else None
        grad_k = torch.zeros_like(kernel) if need_k else None
        for i in range(1, terms + 1):
            # The next h is needed by the next step, or, after the last one, only for x.
            want_h = i < terms or need_x
            h_next, gk = _conv_backward(h, states[i - 1], kernel * ratios[i], p, want_h, need_k)
            if gk is not None:
                grad_k.add_(gk, alpha=ratios[i])
            if h_next is None:
                break
            h = h_next
            if grad_x is not None:
                grad_x.add_(h)
        return grad_x, grad_k, None, None


def conv_exponential(
    x: torch.Tensor,
    kernel: torch.Tensor,
    terms: int | Sequence[float],
    grad_mode: str = "exact",
) -> torch.Tensor:
    """Polynomial ``p(L)x`` of a convolution (SOC's exponential) with the fast backward.

    Under autocast the inputs are cast to the autocast dtype first (as autocast would cast the
    convolutions) and the Function runs with autocast off, so both passes see one dtype.

    Args:
        x: ``(B, C, H, W)`` input.
        kernel: ``(C, C, k, k)`` kernel of ``L``, odd ``k``, zero padding ``k // 2``.
        terms: ``T >= 0`` for the Taylor polynomial ``Σ_{i≤T} Lⁱ/i!``, or the ratio Horner form
            ``(c₀, r₁, …, r_T)`` of any polynomial (:func:`models.exp_series.horner_ratios`).
        grad_mode: ``"exact"`` or ``"paper"`` (see the module docstring).

    Returns:
        ``(B, C, H, W)``.

    Raises:
        ValueError: unknown ``grad_mode``, negative ``terms``, an empty ratio list or a bad
            kernel shape.
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"unknown grad_mode {grad_mode!r}; choose from {', '.join(GRAD_MODES)}")
    if isinstance(terms, bool) or not isinstance(terms, (int, Sequence)):
        raise ValueError(f"terms must be a non-negative int or a ratio sequence, got {terms!r}")
    if isinstance(terms, int):
        if terms < 0:
            raise ValueError(f"terms must be a non-negative int, got {terms!r}")
        ratios = (1.0, *(1.0 / i for i in range(1, terms + 1)))
    else:
        ratios = tuple(float(r) for r in terms)
        if not ratios:
            raise ValueError("the ratio sequence needs at least c0")
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[-1] % 2 == 0:
        raise ValueError(f"kernel must be (C, C, k, k) with odd k, got {tuple(kernel.shape)}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return ConvExponentialFunction.apply(x.to(dtype), kernel.to(dtype), ratios, grad_mode)
    return ConvExponentialFunction.apply(x, kernel, ratios, grad_mode)


__all__ = [
    "GRAD_MODES",
    "ConvExponentialFunction",
    "conv_exponential",
    "is_skew_kernel",
    "resolve_grad_mode",
]
