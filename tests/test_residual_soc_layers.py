"""Method-specific checks of CPL, SLL (residual, zero padding) and SOC (convolution exponential).

The generic contract (exact norms, export, state dict, gradients, sizes) is in test_layers.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import create_layer
from models.layers.cpl import CPLConv2d, conv_power_iteration, infinite_image_norm
from models.layers.sll import sll_rescaling
from models.layers.soc import (
    TRUNCATION_TOL,
    SOCConv2d,
    reshaped_matrices,
    skew_kernel,
    spectral_bound,
)
from models.ops import circular_conv_singular_values
from tests.lipschitz_utils import adversarial_steps, jacobian_matrix


def conv_matrix(kernel: torch.Tensor, n: int) -> torch.Tensor:
    """The zero-padded 'same' convolution on ``n × n`` as a dense matrix (identity basis)."""
    c_in = kernel.shape[1]
    basis = torch.eye(c_in * n * n, dtype=kernel.dtype).view(-1, c_in, n, n)
    out = F.conv2d(basis, kernel, padding=kernel.shape[-1] // 2)
    return out.reshape(basis.shape[0], -1).T  # (c_out·n², c_in·n²)


def opnorm(m: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(m, ord=2).item()


# -- SOC ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 4, 6])
def test_soc_skew_kernel_gives_an_exactly_skew_symmetric_operator(n):
    w = torch.randn(3, 3, 3, 3, dtype=torch.float64)
    m = conv_matrix(skew_kernel(w), n)
    assert opnorm(m) > 0.1  # not trivially zero
    torch.testing.assert_close(m.T, -m, atol=1e-12, rtol=0)


def test_soc_scaled_kernel_norm_is_at_most_0p7_on_every_size():
    layer = SOCConv2d(4, 3)
    adversarial_steps(layer, (4, 6, 6), steps=10)
    kernel = layer.eval_kernel().double()
    norms = [opnorm(conv_matrix(kernel, n)) for n in (3, 5, 8)]
    # The infinite-image norm (sup over all frequencies) is approached by a fine circular grid.
    norms.append(circular_conv_singular_values(kernel, 48).max().item())
    assert max(norms) <= 0.7 + 1e-9, norms
    assert max(norms) > 0.3  # scaled, not collapsed


def test_soc_sound_bound_dominates_the_norm_and_the_paper_bound_does_not():
    torch.manual_seed(3)
    kernel = skew_kernel(torch.randn(8, 8, 3, 3, dtype=torch.float64))
    true = circular_conv_singular_values(kernel, 48).max().item()
    assert spectral_bound(kernel, "sound").item() >= true
    # The SOC code's min ‖R_i‖ (no √(hw)) underestimates: documented departure from the paper.
    assert spectral_bound(kernel, "paper").item() < true
    # What the paper scaling does guarantee: ‖L‖ ≤ 0.7·√(hw), and min ‖R_i‖ = 0.7 exactly.
    layer = SOCConv2d(8, 3, bound="paper")
    scaled = layer.eval_kernel().double()
    assert min(opnorm(r) for r in reshaped_matrices(scaled)) == pytest.approx(0.7, abs=1e-6)
    assert circular_conv_singular_values(scaled, 48).max().item() <= 0.7 * 3


def test_soc_1x1_kernel_is_scaled_to_norm_exactly_one():
    layer = SOCConv2d(6, 1)
    assert opnorm(layer.eval_kernel().double()[:, :, 0, 0]) == pytest.approx(1.0, abs=1e-6)


def test_soc_training_estimates_converge_to_the_exact_scaling():
    layer = SOCConv2d(6, 3)
    with torch.no_grad():
        for _ in range(40):  # weights fixed: the persistent vectors converge
            train_kernel = layer.train_kernel()
    torch.testing.assert_close(train_kernel, layer.eval_kernel(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("series,tol", [("taylor", 1e-6), ("chebyshev", TRUNCATION_TOL)])
def test_soc_export_is_orthogonal_to_its_truncation_error(series, tol):
    # Taylor's error falls fast below the a-priori norm 0.7, Chebyshev's is spread evenly over
    # [0, 0.7] (about 1e-5 here): each within what its series promises.
    layer = create_layer("soc", 4, 3, series=series)
    adversarial_steps(layer, (4, 6, 6), steps=10)
    sv = torch.linalg.svdvals(jacobian_matrix(layer.eval().export(), torch.randn(1, 4, 6, 6)))
    assert (sv - 1).abs().max() < tol


# -- SLL ---------------------------------------------------------------------------------------
def test_sll_rescaling_matches_a_direct_computation_from_the_gram_matrix():
    c, k = 3, 3
    kernel = torch.randn(c, c, k, k, dtype=torch.float64)
    log_q = torch.randn(c, dtype=torch.float64)
    n = 2 * (k - 1) + 1  # the centre pixel sees every shift of KKᵀ, no border effect
    m = conv_matrix(kernel, n)
    gram = (m @ m.T).view(c, n, n, c, n, n)
    q = log_q.exp()
    centre = n // 2
    direct = torch.stack([
        (gram[j, centre, centre].abs() * q[:, None, None]).sum() / q[j] for j in range(c)
    ])
    torch.testing.assert_close(sll_rescaling(kernel, log_q, eps=0.0), 2 / direct)


@pytest.mark.parametrize("n", [2, 5])
def test_sll_satisfies_the_sdp_condition_on_finite_zero_padded_maps(n):
    kernel = torch.randn(3, 3, 3, 3, dtype=torch.float64)
    t = sll_rescaling(kernel, torch.randn(3, dtype=torch.float64))
    m = conv_matrix(kernel, n)  # K on n×n, inner channel index is the slow one
    t_diag = torch.diag((2 / t).repeat_interleave(n * n))
    assert torch.linalg.eigvalsh(t_diag - m @ m.T).min() >= -1e-10


# -- CPL ---------------------------------------------------------------------------------------
def test_cpl_power_iteration_converges_to_the_exact_norm():
    kernel = torch.randn(3, 3, 3, 3, dtype=torch.float64)
    exact = opnorm(conv_matrix(kernel, 5))
    start = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    early, _ = conv_power_iteration(kernel, start, 10)
    assert early.item() <= exact  # an estimate from below, never a bound
    # Close top singular values (9.480 vs 9.466 here) make it slow: 500 steps are 1e-4 short.
    sigma, u = conv_power_iteration(kernel, start, 2000)
    assert sigma.item() == pytest.approx(exact, rel=1e-6)
    assert u.norm().item() == pytest.approx(1.0)


def test_cpl_eval_sigma_bounds_every_size_and_is_tight():
    layer = CPLConv2d(4, 3)
    adversarial_steps(layer, (4, 6, 6), steps=10)
    kernel = layer.weight.detach().double()
    sup = infinite_image_norm(kernel).item()
    for n in (2, 5, 9):
        assert opnorm(conv_matrix(kernel, n)) <= sup
    circular = circular_conv_singular_values(kernel, 64).max().item()
    assert circular <= sup + 1e-12 and sup <= circular * (1 + 1e-3)
    assert layer.eval_sigma().item() == pytest.approx(sup)


def test_cpl_vector_grows_with_the_input_and_survives_the_state_dict():
    a, b = CPLConv2d(2, 3, power_size=8), CPLConv2d(2, 3, power_size=8)
    a.train()(torch.randn(1, 2, 11, 9))
    assert a.u.shape == (1, 2, 11, 11) and bool(a.u_ready)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.u, a.u)
    x = torch.randn(2, 2, 11, 11)
    torch.testing.assert_close(b.train()(x), a.train()(x))


@pytest.mark.parametrize("method", ["cpl", "sll"])
def test_residual_layers_are_lipschitz_on_random_pairs(method):
    layer = create_layer(method, 4, 3)
    adversarial_steps(layer, (4, 7, 7), steps=20)
    layer.eval()
    plain = layer.export()
    x = torch.randn(256, 4, 7, 7, dtype=torch.float64)
    y = x + torch.randn_like(x) * torch.logspace(-3, 1, 256, dtype=torch.float64).view(-1, 1, 1, 1)
    with torch.no_grad():
        for f in (layer.double(), plain.double()):
            ratio = (f(x) - f(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
            assert ratio.max().item() <= 1 + 1e-9
            assert ratio.max().item() > 0.5  # the pairs do probe the nonlinearity


# -- options -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,options,match",
    [
        ("soc", {"bound": "exact"}, "unknown bound 'exact'; choose from sound, paper"),
        ("soc", {"eval_terms": 0}, "eval_terms must be a positive int"),
        ("cpl", {"margin": 0.9}, "margin must be >= 1"),
        ("sll", {"eps": 0.0}, "eps must be > 0"),
    ],
)
def test_bad_options_raise_clear_errors(method, options, match):
    with pytest.raises(ValueError, match=match):
        create_layer(method, 4, 3, **options)
