"""BCOP, Cayley and LOT: the maths behind them and their real-valued (ONNX) export forms."""

from __future__ import annotations

import copy

import pytest
import torch

from models import create_layer
from models.layers.cayley import CayleyConv2d
from models.layers.lot import LOTConv2d, lot_orthogonalize
from models.ops import (
    _bjorck_steps_to,
    bjorck,
    cayley,
    circular_conv_singular_values,
    circular_conv_spectrum,
    newton_schulz_inverse_sqrt,
    skew,
    spectral_norm_upper_bound,
    spectrum_to_circular_kernel,
)
from models.plain import CircularConv2d, FourierConv2d
from tests.lipschitz_utils import adversarial_steps, jacobian_matrix, singular_values


def _float32_kernel(*shape: int) -> torch.Tensor:
    # Values exactly representable in float32, so CircularConv2d's float32 buffer is lossless.
    return torch.randn(*shape).double()


# -- shared maths -----------------------------------------------------------------------------
@pytest.mark.parametrize("k,n,m", [(3, 5, 5), (3, 4, 6), (5, 3, 3), (1, 4, 4)])
def test_circular_conv_singular_values_match_the_identity_basis_jacobian(k, n, m):
    kernel = _float32_kernel(3, 3, k, k)
    exact = torch.linalg.svdvals(jacobian_matrix(CircularConv2d(kernel), torch.zeros(1, 3, n, m)))
    fast = circular_conv_singular_values(kernel, n, m).flatten()
    torch.testing.assert_close(fast.sort().values, exact.sort().values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [4, 5])
def test_spectrum_to_circular_kernel_inverts_the_spectrum(n):
    kernel = _float32_kernel(3, 2, 3, 3)
    big = spectrum_to_circular_kernel(circular_conv_spectrum(kernel, n, onesided=True), n)
    assert big.shape[-1] == (n if n % 2 else n + 1)
    x = torch.randn(2, 2, n, n).double()
    torch.testing.assert_close(
        CircularConv2d(big).double()(x), CircularConv2d(kernel).double()(x), atol=1e-6, rtol=0
    )


def test_bjorck_converges_to_the_polar_factor():
    u, _ = torch.linalg.qr(torch.randn(3, 32, 32, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(3, 32, 32, dtype=torch.float64))
    w = 5 * u @ torch.diag_embed(torch.linspace(0.2, 1.0, 32, dtype=torch.float64)) @ v.mT
    q = bjorck(w, iters=20)
    torch.testing.assert_close(q, u @ v.mT, atol=1e-8, rtol=0)
    # A near-orthogonal 256 × 256 matrix (the training regime) converges too.
    big = torch.linalg.qr(torch.randn(256, 256, dtype=torch.float64))[0] + 1e-2 * torch.randn(
        256, 256, dtype=torch.float64
    )
    q = bjorck(big, iters=20)
    torch.testing.assert_close(q.mT @ q, torch.eye(256, dtype=torch.float64), atol=1e-8, rtol=0)


def _bjorck_loop(w: torch.Tensor, iters: int) -> torch.Tensor:
    """The plain differentiable loop: fixed ``iters`` steps, autograd through every one."""
    w = w / spectral_norm_upper_bound(w.detach()).clamp_min(1e-12)
    for _ in range(iters):
        w = 1.5 * w - 0.5 * w @ (w.mT @ w)
    return w


def _steps(out: torch.Tensor) -> int:
    """Björck steps behind ``out``: the one node saves (iterate, Gram) per step taken."""
    node = out.grad_fn
    while not hasattr(node, "saved_tensors"):  # past the reshape back to the input's batch dims
        node = node.next_functions[0][0]
    return len(node.saved_tensors) // 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bjorck_stops_when_converged_with_the_fixed_loops_value_and_gradient(dtype):
    torch.manual_seed(0)
    # Near-orthogonal (the training regime) and a spread spectrum; square and tall (AOC).
    near = torch.linalg.qr(torch.randn(5, 32, 32, dtype=torch.float64))[0]
    near = near + 3e-2 * torch.randn(5, 32, 32, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(2, 24, 12, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(2, 12, 12, dtype=torch.float64))[0]
    tall = u @ torch.diag_embed(torch.linspace(0.3, 1.0, 12, dtype=torch.float64)) @ v.mT
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    for start in (near, tall):
        w = start.to(dtype).requires_grad_(True)
        ref_w = start.to(dtype).requires_grad_(True)
        out, ref = bjorck(w, iters=20), _bjorck_loop(ref_w, 20)
        assert _steps(out) < 20, "a converged start should not run all 20 steps"
        torch.testing.assert_close(out, ref, atol=tol, rtol=0)
        probe = torch.randn_like(out)
        (out * probe).sum().backward()
        (ref * probe).sum().backward()
        torch.testing.assert_close(w.grad, ref_w.grad, atol=10 * tol, rtol=0)
    # An exactly orthogonal start takes one step; an ill-conditioned one still gets all 20.
    q = torch.linalg.qr(torch.randn(3, 16, 16, dtype=dtype))[0].requires_grad_(True)
    assert _steps(bjorck(q, iters=20)) == 1
    bad = q.detach() @ torch.diag_embed(torch.logspace(-4, 0, 16, dtype=dtype))  # σ_min = 1e-4
    bad.requires_grad_(True)
    assert _steps(bjorck(bad, iters=20)) == 20


def test_bjorck_tests_convergence_where_predicted_and_stops_within_a_step_of_every_step_testing():
    torch.manual_seed(1)
    eps_tol = torch.finfo(torch.float32).eps ** 0.5
    u = torch.linalg.qr(torch.randn(4, 24, 24))[0]
    for smallest in (0.9, 0.3, 0.05, 0.01):  # the fewer steps, the nearer orthogonal
        start = u @ torch.diag_embed(torch.linspace(smallest, 1.0, 24)) @ u.mT
        w, first = start.clone(), None  # the plain loop, tested at every step
        for i in range(40):
            gram = w.mT @ w
            if first is None and (gram - torch.eye(24)).abs().amax() <= eps_tol:
                first = i + 1
            w = 1.5 * w - 0.5 * w @ gram
        taken = _steps(bjorck(start.requires_grad_(True), iters=40))
        assert first is not None and first <= taken <= first + 1, (smallest, first, taken)
    # The scalar model: at least one step, more for a larger deviation, and converged starts
    # (a deviation already within the tolerance) are re-tested at the very next step.
    counts = [_bjorck_steps_to(g, eps_tol, 0.5) for g in (0.0, 1e-3, 0.1, 0.5, 0.9, 0.999)]
    assert counts[0] == counts[1] == 1 and counts == sorted(counts) and counts[-1] > counts[2]


def test_spectral_norm_upper_bound_is_an_upper_bound_and_tight_when_orthogonal():
    w = torch.randn(20, 8, 8, dtype=torch.float64)
    assert (spectral_norm_upper_bound(w).flatten() >= torch.linalg.matrix_norm(w, 2) - 1e-12).all()
    q = 3 * torch.linalg.qr(w)[0]
    torch.testing.assert_close(
        spectral_norm_upper_bound(q).flatten(), torch.full((20,), 3.0).double()
    )


def test_newton_schulz_inverse_sqrt_accuracy_and_lot_polar_factor():
    # Hermitian PD S with eigenvalues in [0.1, 1]: 10 steps give S^(-1/2) to 1e-6.
    u = torch.linalg.qr(torch.randn(16, 6, 6, dtype=torch.complex128))[0]
    lam = torch.linspace(0.1, 1.0, 6, dtype=torch.float64).to(torch.complex128)
    s = u @ torch.diag_embed(lam) @ u.mH
    z = newton_schulz_inverse_sqrt(s, iters=10)
    torch.testing.assert_close(z @ s @ z, torch.eye(6, dtype=torch.complex128).expand_as(s),
                               atol=1e-6, rtol=0)
    # LOT's Q: singular values σ/√(σ² + 1e-4) (≈ 1) when converged, never above 1 in any case.
    w = torch.randn(16, 6, 6, dtype=torch.complex128)
    sv = torch.linalg.svdvals(lot_orthogonalize(w, iters=10))
    assert sv.max() <= 1 + 1e-12
    bad = w @ torch.diag(torch.tensor([1.0, 1, 1, 1, 1, 1e-3], dtype=torch.complex128))
    assert torch.linalg.svdvals(lot_orthogonalize(bad, iters=10)).max() <= 1 + 1e-12


# -- BCOP -------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels,k", [(5, 5), (6, 3), (4, 1)])
def test_bcop_kernel_is_orthogonal_for_odd_channels_and_larger_kernels(channels, k):
    layer = create_layer("bcop", channels, k)
    with torch.no_grad():
        layer.matrices.add_(0.3 * torch.randn_like(layer.matrices))  # away from the init
        kernel = layer.orthogonal_kernel(layer.matrices.double())
    sv = circular_conv_singular_values(kernel, 7)
    torch.testing.assert_close(sv, torch.ones_like(sv), atol=1e-8, rtol=0)


# -- Cayley -----------------------------------------------------------------------------------
def test_cayley_alpha_is_a_parameter_that_learns_and_starts_as_the_paper():
    layer = CayleyConv2d(4, 3)
    assert any(p is layer.alpha for p in layer.parameters())
    torch.testing.assert_close(layer.alpha.detach(), layer.weight.detach().norm())
    # At init α·Ŵ/‖W‖_F is Ŵ itself: Q = cayley(skew(Ŵ)) as in the paper.
    with torch.no_grad():
        w_hat = circular_conv_spectrum(layer.weight.double(), 6, onesided=True)
        torch.testing.assert_close(layer.spectrum(6, layer.weight.double()), cayley(skew(w_hat)))
    x = torch.randn(2, 4, 6, 6)
    layer(x).square().sum().backward()
    assert layer.alpha.grad is not None and layer.alpha.grad.abs() > 0


def test_cayley_eval_cache_is_per_size():
    layer = CayleyConv2d(4, 3)
    adversarial_steps(layer, (4, 6, 6), steps=2)
    layer.eval()
    with torch.no_grad():
        y5, y8 = layer(torch.ones(1, 4, 5, 5)), layer(torch.ones(1, 4, 8, 8))
    layer.train()
    with torch.no_grad():
        torch.testing.assert_close(y5, layer(torch.ones(1, 4, 5, 5)))
        torch.testing.assert_close(y8, layer(torch.ones(1, 4, 8, 8)))


# -- LOT --------------------------------------------------------------------------------------
def test_lot_uncropped_circular_operator_is_orthogonal_after_adversarial_training():
    layer = LOTConv2d(4, 3)
    adversarial_steps(layer, (4, 8, 8), steps=20)
    op = layer.circular_operator(8)  # on N = 10
    assert op.input_size == 10
    sv = singular_values(op, torch.zeros(1, 4, 10, 10))
    assert sv.max() <= 1 + 1e-4 and sv.min() >= 0.99, (sv.min(), sv.max())


def test_lot_cropped_layer_is_lipschitz_but_not_orthogonal():
    # A pure one-pixel shift is orthogonal on the circle; the crop loses a boundary row.
    layer = LOTConv2d(2, 3, bias=False).eval()
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:, :, 1, 2] = torch.eye(2)
    sv = singular_values(copy.deepcopy(layer), torch.zeros(1, 2, 6, 6))
    assert sv.max() <= 1 + 1e-4 and sv.min() < 0.5
    assert not LOTConv2d.orthogonal and LOTConv2d.padding == "zero"


# -- export forms -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["cayley", "lot"])
def test_export_needs_a_size_and_uses_the_last_one(method):
    layer = create_layer(method, 4, 3)
    with pytest.raises(ValueError, match="call the layer on an input first or pass input_size"):
        layer.export()
    assert layer.export(input_size=6).input_size == 6
    layer.eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        layer(x)
        exported = layer.export()
        assert isinstance(exported, FourierConv2d) and exported.input_size == 5
        torch.testing.assert_close(exported(x), layer(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="exported for 5x5"):
        exported(torch.randn(1, 4, 6, 6))
    # kernel_size 1 is a plain 1×1 convolution: no size needed.
    assert isinstance(create_layer(method, 4, 1).export(), CircularConv2d)


@pytest.mark.parametrize("method", ["cayley", "lot"])
def test_fourier_export_runs_in_onnx_runtime_like_the_layer(method, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    layer = create_layer(method, 4, 3)
    adversarial_steps(layer, (4, 8, 8), steps=3)
    layer.eval()
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        expected = layer(x)
    plain = layer.export()
    path = tmp_path / "fourier.onnx"
    torch.onnx.export(
        plain, (x[:1],), str(path), input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=19, dynamo=False,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n,pad", [(5, 0), (6, 0), (4, 1)])
def test_fourier_lipschitz_upper_bound_is_sound_and_tight(n, pad):
    kernel = torch.randn(3, 3, 3, 3, dtype=torch.float64)  # not orthogonal: norm well above 1
    size = n + 2 * pad
    module = FourierConv2d(circular_conv_spectrum(kernel, size, onesided=True), pad=pad)
    bound = module.lipschitz_upper_bound()
    exact = singular_values(copy.deepcopy(module), torch.zeros(1, 3, n, n)).max().item()
    assert exact <= bound
    if pad == 0:  # the circular map itself: the bound is its exact norm up to float32 storage
        assert bound <= exact + 1e-3
    else:  # cropped: bounded by the circular operator's norm
        circular = circular_conv_singular_values(kernel, size).max().item()
        assert bound <= circular + 1e-3


def test_fourier_bound_of_an_orthogonal_export_is_one():
    layer = CayleyConv2d(4, 3)
    adversarial_steps(layer, (4, 8, 8), steps=3)
    module = layer.export(input_size=8)
    exact = singular_values(copy.deepcopy(module), torch.zeros(1, 4, 8, 8))
    bound = module.lipschitz_upper_bound()
    assert exact.max() <= bound <= exact.max() + 1e-3
    assert abs(bound - 1) < 1e-5
