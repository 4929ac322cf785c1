"""CPL: Convex Potential Layers.

Meunier, Delattre, Araujo & Allauzen, "A Dynamical System Perspective for Lipschitz Neural
Networks", ICML 2022, arXiv:2110.12690.

The layer is one explicit Euler step on a convex potential: ``y = x − (2/σ²) Kᵀ ReLU(Kx + b)``
with ``σ = ‖K‖₂``. Its Jacobian ``I − (2/σ²) Kᵀ D K`` (``D`` diagonal in ``[0, 1]``) has norm
``max(1, 2‖D^½K‖²/σ² − 1) ≤ 1`` whenever ``σ ≥ ‖K‖₂``.

σ in training: as in the paper, a power-iteration *estimate* (a lower bound), one step per
training forward on a persistent vector ``u`` (a buffer, saved in the state dict), with the
gradient flowing through ``K``; ``u`` gets ``init_iters`` (50) steps at the first training
forward (the paper's code starts from a random vector). ``u`` lives on ``m × m`` maps with
``m = max(power_size, largest H or W seen in training)`` (``power_size`` = 32, the largest map of
the CIFAR / Fashion-MNIST networks; ``1 × 1`` for ``k = 1``, where the norm does not depend on the
size). With zero padding ``‖K‖`` on an ``n × n`` map grows with ``n`` towards the infinite-image
norm, so one vector on a large map estimates a σ that serves every smaller input.

σ at evaluation and export (departure from the paper, which runs 100 power steps): the supremum
over frequencies ``ω`` of ``‖K̂(ω)‖₂``, the norm of the convolution on the infinite image. It is
an upper bound of the zero-padded ``‖K‖`` on *every* map size, so one exported module is valid for
any input size. We measured 100 power steps to stay 2e-3 below ``‖K‖`` on a trained 16-channel
kernel at 32×32 (a Lipschitz constant up to 1.008 per layer); the supremum is found by exact SVDs
on a 12×12 frequency grid and a local pattern search from the 3 best points, so it is a
numerical maximum, not a proof: the certificate still comes from the audit's independent bound.
``margin`` (default 1.0) multiplies it for extra safety. Cost, once per ``eval()`` (cached):
about 0.02 s at 16 channels and 1.4 s at 128 channels on one CPU core.

Guarantee: 1-Lipschitz at evaluation / export up to that numerical maximization; in training
only approximately (the estimate lags ``‖K‖`` by about 1 % after a step).
Padding: zero (``conv2d`` and its exact adjoint ``conv_transpose2d`` with the same padding).
Init: Xavier-normal kernel, bias uniform in ``±1/√fan_in`` (as the comparison paper's code).
Training form: :func:`models.ops.residual_conv` (the same map, the scale folded into the transposed
convolution's kernel; ``channels_last`` on CPU).
Inference: :class:`models.plain.ResidualConv2d` with the constant ``scale = 2/σ²`` (float64 σ).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.base import LipschitzConv2d
from models.ops import conv_layout, power_iteration, residual_conv
from models.plain import ResidualConv2d
from models.registry import register_method

# The 8 neighbours the local refinement of the symbol's maximum tries.
_MOVES = torch.tensor(
    [[a, b] for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)], dtype=torch.float64
)


def conv_power_iteration(
    kernel: torch.Tensor, u: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Power iteration for the norm of the zero-padded convolution ``K`` on ``u``'s map size.

    Args:
        kernel: ``(c_out, c_in, k, k)`` kernel.
        u: ``(1, c_in, m, m)`` start vector (any norm).
        steps: number of ``u ← KᵀKu / ‖KᵀKu‖`` steps (0: just the estimate at ``u``).

    Returns:
        ``(sigma, u)``: the estimate ``‖Ku‖`` (a lower bound of ``‖K‖₂``) and the unit vector.
    """
    p = kernel.shape[-1] // 2
    return power_iteration(
        lambda v: F.conv2d(v, kernel, padding=p),
        lambda v: F.conv_transpose2d(v, kernel, padding=p),
        u / u.norm().clamp_min(1e-12),
        steps,
    )


def symbol_norms(kernel: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """``‖K̂(ω)‖₂`` with ``K̂(ω) = Σ_s K[s] e^{i ω·(s − k//2)}`` at the frequencies ``omega``.

    Args:
        kernel: ``(c_out, c_in, k, k)`` real kernel (float64 recommended).
        omega: ``(M, 2)`` float64 frequencies.

    Returns:
        ``(M,)`` largest singular values.
    """
    k = kernel.shape[-1]
    s = torch.arange(k, dtype=torch.float64, device=kernel.device) - k // 2
    ones = torch.ones(len(omega), k, dtype=torch.float64, device=kernel.device)
    e1, e2 = torch.polar(ones, omega[:, :1] * s), torch.polar(ones, omega[:, 1:] * s)
    symbol = torch.einsum("oiab,ma,mb->moi", kernel.to(torch.complex128), e1, e2)
    return torch.linalg.svdvals(symbol)[:, 0]


@torch.no_grad()
def infinite_image_norm(
    kernel: torch.Tensor, grid: int = 12, candidates: int = 3, rounds: int = 16
) -> torch.Tensor:
    """``sup_ω ‖K̂(ω)‖₂``: the convolution's norm on the infinite image (float64 scalar).

    It bounds the zero-padded convolution's norm on every finite map from above (a finite map is
    a compression of the infinite one), and the circular one on every size (whose frequencies
    are a subset of all ``ω``). Found numerically: exact SVDs on a ``grid × grid`` frequency grid
    (half of it: ``K̂(−ω)`` is the conjugate of ``K̂(ω)`` for a real kernel), then a pattern
    search from the ``candidates`` best points (8 neighbours; the step is divided by 4 when none
    is better). Every value is an exact SVD, so the result is a maximum over the points tried:
    on random and identity-dominated kernels (8-128 channels) it agreed to 1e-10 with a finer,
    longer search.

    Args:
        kernel: ``(c_out, c_in, k, k)`` kernel.
        grid: frequency grid points per axis.
        candidates: grid points refined.
        rounds: refinement rounds.

    Returns:
        A 0-dim float64 tensor.
    """
    kernel = kernel.detach().double()
    if kernel.shape[-1] == 1:  # the symbol is constant
        return torch.linalg.matrix_norm(kernel[:, :, 0, 0], ord=2)
    two_pi = 2 * math.pi
    f = torch.arange(grid, dtype=torch.float64, device=kernel.device) * (two_pi / grid)
    omega = torch.cartesian_prod(f, f[: grid // 2 + 1])
    values = symbol_norms(kernel, omega)
    top = values.topk(min(candidates, len(values))).indices
    best_w, best_v = omega[top], values[top]
    step = torch.full_like(best_v, two_pi / grid)
    rows = torch.arange(len(top), device=kernel.device)
    moves = _MOVES.to(kernel.device)
    for _ in range(rounds):
        points = best_w[:, None, :] + step[:, None, None] * moves[None]  # (candidates, 8, 2)
        v = symbol_norms(kernel, points.reshape(-1, 2)).view(len(top), -1)
        v_max, idx = v.max(dim=1)
        moved = v_max > best_v
        best_w = torch.where(moved[:, None], points[rows, idx], best_w)
        best_v = torch.maximum(best_v, v_max)
        step = torch.where(moved, step, step / 4)
    return best_v.max()


@register_method("cpl")
class CPLConv2d(LipschitzConv2d):
    """Convex potential residual convolution, zero padding.

    Args:
        channels: input = output channels (also the inner channels of ``K``).
        kernel_size: odd kernel size.
        bias: learned bias ``b`` inside the ReLU.
        power_size: smallest map side of the training power-iteration vector (``k > 1``).
        init_iters: power steps that warm the vector up (first training forward, or grown).
        margin: safety factor ``≥ 1`` applied to the evaluation / export σ.

    Raises:
        ValueError: bad ``channels``, ``kernel_size``, ``power_size``, ``init_iters`` or ``margin``.
    """

    padding = "zero"
    lipschitz = True
    orthogonal = False

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        *,
        bias: bool = True,
        power_size: int = 32,
        init_iters: int = 50,
        margin: float = 1.0,
    ) -> None:
        super().__init__(channels, kernel_size, bias=bias)
        if not isinstance(power_size, int) or power_size < 1:
            raise ValueError(f"power_size must be a positive int, got {power_size!r}")
        if not isinstance(init_iters, int) or init_iters < 0:
            raise ValueError(f"init_iters must be a non-negative int, got {init_iters!r}")
        if not margin >= 1.0:
            raise ValueError(f"margin must be >= 1 (a safety factor), got {margin!r}")
        self.init_iters = init_iters
        self.margin = float(margin)
        self.weight = nn.Parameter(torch.empty(channels, channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        nn.init.xavier_normal_(self.weight)
        self.init_bias_uniform()
        m = power_size if kernel_size > 1 else 1
        u = torch.randn(1, channels, m, m)
        self.register_buffer("u", u / u.norm())
        # ``u`` gets its ``init_iters`` steps at the first training forward, not here: building a
        # wide network must stay cheap, and the kernel may still be replaced by a checkpoint.
        self.register_buffer("u_ready", torch.zeros((), dtype=torch.bool))
        self._ready = False  # mirrors u_ready without reading a device tensor every step

    # -- the training power-iteration vector ----------------------------------------------------
    @torch.no_grad()
    def _fresh_vector(self, m: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
        u = torch.randn(1, self.channels, m, m, dtype=dtype, device=device)
        return conv_power_iteration(self.weight.detach().to(dtype), u, self.init_iters)[1]

    def _prepare_vector(self, x: torch.Tensor) -> None:
        """Warm ``u`` up once, and grow it to cover ``x``'s map (``k > 1`` only)."""
        n = max(x.shape[-2:])
        if self.kernel_size > 1 and n > self.u.shape[-1]:
            # Replacing the registered buffer (new shape) keeps it in the state dict.
            self.u = self._fresh_vector(n, self.u.dtype, self.u.device)
            self.u_ready.fill_(True)
        elif not self._ready and not bool(self.u_ready):
            with torch.no_grad():
                _, u = conv_power_iteration(self.weight, self.u, self.init_iters)
                self.u.copy_(u)
            self.u_ready.fill_(True)
        self._ready = True

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The vector's map size is part of the saved state: adopt it before copying.
        saved = state_dict.get(prefix + "u")
        if saved is not None and saved.shape != self.u.shape:
            self.u = torch.empty(saved.shape, dtype=self.u.dtype, device=self.u.device)
        self._ready = False  # re-read u_ready after loading
        super()._load_from_state_dict(state_dict, prefix, *args)

    # -- σ and the scale ------------------------------------------------------------------------
    def train_sigma(self) -> torch.Tensor:
        """One power step on the persistent ``u`` (updated); the gradient flows through ``K``."""
        with torch.no_grad():
            _, u = conv_power_iteration(self.weight, conv_layout(self.u), 1)
            self.u.copy_(u)
        # The fresh ``u``, not the buffer: autograd saves it, and the buffer changes next call.
        return F.conv2d(u, self.weight, padding=self.kernel_size // 2).norm()

    def eval_sigma(self) -> torch.Tensor:
        """Evaluation / export σ: the infinite-image norm (float64) times ``margin``."""
        return infinite_image_norm(self.weight) * self.margin

    def _eval_scale(self) -> torch.Tensor:
        sigma = self.eval_sigma()
        return (2.0 / sigma.square().clamp_min(1e-12)).expand(self.channels).to(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        if self.training:
            self._prepare_vector(x)
            scale = 2.0 / self.train_sigma().square().clamp_min(1e-12)
        else:
            scale = self.cached("scale", self._eval_scale)
        return residual_conv(x, self.weight, self.bias, scale)

    @torch.no_grad()
    def export(self) -> nn.Module:
        return ResidualConv2d(self.weight, self.bias, self._eval_scale())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", power_size={self.u.shape[-1]}, margin={self.margin:g}"
