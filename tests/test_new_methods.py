"""AOC, BRO and Sandwich: exact norms, their maths, export parity, audited bounds, LipNet, training.

The generic layer contract (export equality, state dict, gradients, sizes) is also checked for
them by test_layers.py, which is parametrized over the registry.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from models import create_layer, create_model, layer_class
from models.layers.aoc import aoc_kernel
from models.layers.bro import BROConv2d
from models.layers.sandwich import cayley_rows
from models.ops import block_reflector, circular_conv_singular_values, circular_conv_spectrum
from models.plain import CircularConv2d, FourierConv2d, Sandwich2d
from tests.lipschitz_utils import adversarial_steps, singular_values

NEW = ["aoc", "bro", "sandwich"]
LINEAR = ["aoc", "bro"]  # linear layers: the Jacobian is the whole operator
C, N = 4, 6


def pair_ratios(f: torch.nn.Module, shape: tuple[int, ...], count: int = 256) -> torch.Tensor:
    """‖f(x) − f(y)‖ / ‖x − y‖ on random float64 pairs at distances from 1e-3 to 10."""
    gen = torch.Generator().manual_seed(5)
    f = copy.deepcopy(f).double().eval()
    x = torch.randn((count, *shape), generator=gen, dtype=torch.float64)
    scale = torch.logspace(-3, 1, count, dtype=torch.float64).view(-1, 1, 1, 1)
    y = x + scale * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        return (f(x) - f(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)


# -- exactly 1-Lipschitz, as built and as exported --------------------------------------------
CASES = [(m, {}) for m in NEW] + [("sandwich", {"init": "reference"}), ("bro", {"rank": 1})]


@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("method,options", CASES)
def test_norm_at_most_one_at_init_and_after_300_adversarial_steps(method, options, kernel_size):
    layer = create_layer(method, C, kernel_size, **options)
    checks = []
    for stage in ("init", "trained"):
        if stage == "trained":
            adversarial_steps(layer, (C, N, N), steps=300)
        layer.eval()
        with torch.no_grad():
            layer(torch.zeros(1, C, N, N))  # the FFT layers export for the size they last saw
        for f in (copy.deepcopy(layer), layer.export()):
            points = 1 if method in LINEAR else 4
            for _ in range(points):
                sv = singular_values(copy.deepcopy(f), torch.randn(1, C, N, N))
                checks.append(sv.max().item())
            if method not in LINEAR:  # the nonlinear sandwich: random pairs too
                checks.append(pair_ratios(f, (C, N, N)).max().item())
    assert max(checks) <= 1 + 1e-6, f"{method} k={kernel_size}: {max(checks):.8f}"
    assert min(checks) > 0.5  # measured something


@pytest.mark.parametrize("channels,k", [(4, 3), (5, 3), (6, 5), (3, 1)])
def test_aoc_is_orthogonal_after_adversarial_training(channels, k):
    layer = create_layer("aoc", channels, k)
    adversarial_steps(layer, (channels, 7, 7), steps=100)
    sv = circular_conv_singular_values(layer.orthogonal_kernel(layer.matrices.double()), 7)
    torch.testing.assert_close(sv, torch.ones_like(sv), atol=1e-6, rtol=0)
    assert layer_class("aoc").orthogonal and layer_class("aoc").padding == "circular"


def test_aoc_is_1_lipschitz_even_when_bjorck_has_not_converged():
    # Singular values 1, 0.5, 0.3 and one Björck step: projectors with eigenvalues strictly
    # inside (0, 1), far from orthogonal, and still norm ≤ 1.
    u = torch.linalg.qr(torch.randn(6, 6, 3, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(6, 3, 3, dtype=torch.float64))[0]
    mats = u @ torch.diag(torch.tensor([1.0, 0.5, 0.3], dtype=torch.float64)) @ v.mT
    kernel = aoc_kernel(mats, bjorck_iters=1)
    sv = circular_conv_singular_values(kernel, 9)
    assert sv.max() <= 1 + 1e-12 and sv.min() < 0.5
    assert kernel.shape == (6, 6, 3, 3)


def test_aoc_has_k_c_squared_parameters_against_bcop():
    aoc, bcop = create_layer("aoc", 8, 3, bias=False), create_layer("bcop", 8, 3, bias=False)
    assert sum(p.numel() for p in aoc.parameters()) == 3 * 8 * 8  # 2k matrices of c × c/2
    assert sum(p.numel() for p in bcop.parameters()) == 5 * 8 * 8


def test_block_reflector_is_hermitian_with_spectrum_in_unit_interval():
    v = torch.randn(10, 6, 3, dtype=torch.complex128)
    v[0, :, 2] = 1e-6 * v[0, :, 1]  # nearly rank deficient: δ moves an eigenvalue off −1
    w = block_reflector(v)
    torch.testing.assert_close(w, w.mH)
    eig = torch.linalg.eigvalsh(w)
    assert eig.min() >= -1 - 1e-12 and eig.max() <= 1 + 1e-12
    # Well-conditioned V: an exact reflector (eigenvalues −1 ×3, +1 ×3).
    expected = torch.tensor([-1.0] * 3 + [1.0] * 3, dtype=torch.float64)
    torch.testing.assert_close(eig[1:], expected.expand(9, 6), atol=1e-3, rtol=0)
    torch.testing.assert_close(block_reflector(torch.zeros(6, 3)), torch.eye(6))


def test_bro_uncropped_operator_is_orthogonal_and_ignores_the_tap_position():
    layer = BROConv2d(4, 3)
    adversarial_steps(layer, (4, 6, 6), steps=50)
    w = layer.weight.detach().double()
    q = layer.spectrum(8, w)
    sv = torch.linalg.svdvals(q)
    # Orthogonal up to the regularizer: δ = 1e-5·mean σ² moves σ = 1 by ~δ/σ².
    assert sv.max() <= 1 + 1e-12 and sv.median() > 1 - 1e-4 and sv.min() > 0.99
    # Moving the taps (here: off-centre in a 5×5 kernel) multiplies V̂(f) by a phase, which
    # cancels in W(f).
    moved = w.new_zeros(4, 2, 5, 5)
    moved[..., :3, 2:] = w
    torch.testing.assert_close(layer.spectrum(8, moved), q, atol=1e-10, rtol=0)
    assert not BROConv2d.orthogonal and BROConv2d.padding == "zero"


def test_bro_rank_option():
    assert BROConv2d(8, 3).rank == 4 and BROConv2d(8, 3, rank=2).weight.shape == (8, 2, 3, 3)
    with pytest.raises(ValueError, match="rank must be an int in 1..8"):
        BROConv2d(8, 3, rank=9)
    with pytest.raises(ValueError, match="eps must be > 0"):
        BROConv2d(8, 3, eps=0.0)


# -- Sandwich ---------------------------------------------------------------------------------
def test_cayley_rows_are_orthonormal():
    w = torch.randn(7, 4, 9, dtype=torch.complex128)
    q = cayley_rows(w)
    torch.testing.assert_close(q @ q.mH, torch.eye(4, dtype=torch.complex128).expand(7, 4, 4))
    real = cayley_rows(torch.randn(3, 6, dtype=torch.float64))
    torch.testing.assert_close(real @ real.T, torch.eye(3, dtype=torch.float64))


def test_sandwich_identity_init_is_relu_and_reference_init_is_available():
    layer = create_layer("sandwich", C, 3).eval()
    x = torch.randn(2, C, N, N)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.relu(x), atol=1e-6, rtol=0)
        head = create_layer("sandwich", C, 1, activation=False).eval()
        torch.testing.assert_close(head(x), x / 2**0.5, atol=1e-6, rtol=0)
    reference = create_layer("sandwich", C, 3, init="reference")
    assert reference.bias.abs().sum() > 0 and reference.weight[:, :C].abs().sum() > 0
    with pytest.raises(ValueError, match="unknown init 'dirac'; choose from identity, reference"):
        create_layer("sandwich", C, 3, init="dirac")


def test_sandwich_linear_form_is_a_contraction():
    layer = create_layer("sandwich", C, 3, activation=False)
    adversarial_steps(layer, (C, N, N), steps=50)
    layer.eval()
    sv = singular_values(copy.deepcopy(layer), torch.randn(1, C, N, N))
    assert sv.max() <= 1 + 1e-9
    assert isinstance(layer.export(), FourierConv2d) and layer.psi is None
    with pytest.raises(ValueError, match="activation must be True or False"):
        create_layer("sandwich", C, 3, activation="relu")


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_sandwich_bound_is_tight_for_the_export(kernel_size):
    layer = create_layer("sandwich", C, kernel_size)
    adversarial_steps(layer, (C, N, N), steps=50)
    layer.eval()
    layer(torch.zeros(1, C, N, N))
    plain = layer.export()
    assert isinstance(plain, Sandwich2d)
    bound = plain.lipschitz_upper_bound()
    assert 1 - 1e-9 < bound <= 1 + 1e-5
    local = singular_values(copy.deepcopy(plain), torch.randn(1, C, N, N)).max().item()
    assert local <= bound


@pytest.mark.parametrize("fourier", [False, True])
def test_sandwich_bound_is_sound_for_arbitrary_stored_weights(fourier):
    # Weights of no sandwich at all (a tampered file): the bound must still dominate the norm.
    gen = torch.Generator().manual_seed(3)
    if fourier:
        parts = [
            FourierConv2d(circular_conv_spectrum(torch.randn(C, C, 3, 3, generator=gen), N,
                                                 onesided=True).to(torch.complex128), bias)
            for bias in (torch.randn(C, generator=gen), None)
        ]
    else:
        parts = [CircularConv2d(torch.randn(C, C, 1, 1, generator=gen), torch.randn(C)),
                 CircularConv2d(torch.randn(C, C, 1, 1, generator=gen))]
    plain = Sandwich2d(*parts, torch.rand(C, generator=gen) + 0.2)
    bound = plain.lipschitz_upper_bound()
    local = [singular_values(copy.deepcopy(plain), torch.randn(1, C, N, N)).max().item()
             for _ in range(5)]
    assert max(local) <= bound and pair_ratios(plain, (C, N, N)).max().item() <= bound
    assert bound > 1.5  # far from a contraction, and the bound says so
    with torch.no_grad():
        plain.outer.weight.mul_(3) if not fourier else plain.outer.blocks.mul_(3)
    assert plain.lipschitz_upper_bound() >= 3 * max(local) * (1 - 1e-6)


def test_sandwich2d_refuses_forms_it_cannot_bound():
    conv = CircularConv2d(torch.randn(C, C, 1, 1))
    fourier = FourierConv2d(circular_conv_spectrum(torch.randn(C, C, 3, 3), N, onesided=True))
    with pytest.raises(ValueError, match="both be 1x1 CircularConv2d or both FourierConv2d"):
        Sandwich2d(conv, fourier, torch.ones(C))
    with pytest.raises(ValueError, match="has no bias"):
        Sandwich2d(conv, CircularConv2d(torch.randn(C, C, 1, 1), torch.ones(C)), torch.ones(C))
    padded = FourierConv2d(circular_conv_spectrum(torch.randn(C, C, 3, 3), N, onesided=True), pad=1)
    with pytest.raises(ValueError, match="unpadded"):
        Sandwich2d(padded, copy.deepcopy(padded), torch.ones(C))
    bad = Sandwich2d(conv, copy.deepcopy(conv), torch.ones(C))
    bad.scale[0, 0] = -1.0
    with pytest.raises(ValueError, match="scale must be positive"):
        bad.lipschitz_upper_bound()


def test_sandwich_bound_stays_sound_when_the_two_maps_store_different_dft_matrices():
    layer = create_layer("sandwich", C, 3)
    adversarial_steps(layer, (C, N, N), steps=20)
    layer.eval()
    plain = layer.export(input_size=N)
    exact = plain.lipschitz_upper_bound()
    with torch.no_grad():
        plain.outer.dft_w.mul_(1.01)  # the outer map's DFT is 1 % off: the maps no longer match
        plain.inner.dft_h[0] += 0.02
    bound = plain.lipschitz_upper_bound()
    local = [singular_values(copy.deepcopy(plain), torch.randn(1, C, N, N)).max().item()
             for _ in range(5)]
    assert max(local) <= bound and pair_ratios(plain, (C, N, N)).max().item() <= bound
    assert exact < bound < 1.5  # the mismatch costs a little, not a refusal


# -- LipNet, ONNX, audit -----------------------------------------------------------------------
def test_sandwich_lipnet_has_no_maxmin_and_a_linear_head():
    from models.blocks import MaxMin

    model = create_model("sandwich", "xxs", 1, 10, 8)
    assert not any(isinstance(m, MaxMin) for m in model.modules())
    assert model.body.stem.includes_activation and not model.head.conv.includes_activation
    assert isinstance(model.eval().export().head.conv, CircularConv2d)
    with pytest.raises(ValueError, match="carries its own activation"):
        create_model("sandwich", "xxs", 1, 10, 8, activation="hh")
    aoc = create_model("aoc", "xxs", 1, 10, 8)
    assert sum(isinstance(m, MaxMin) for m in aoc.modules()) == 1 + 3 * 3


#: Peak learning rates of the smoke run (those of training/config.py's table).
SMOKE_LR = {"aoc": 3e-2, "bro": 3e-2, "sandwich": 3e-2}


@pytest.mark.parametrize("method", NEW)
def test_digits_smoke_run_learns_exports_with_onnx_parity_and_audits(method, tmp_path):
    """A few seconds of SGD on digits (xxs), then ONNX Runtime parity and the audited bound.

    The whole pipeline (``python -m training``: budget, store, metadata) runs for every
    registered method in test_training.py; this checks the three layers' part quickly.
    """
    ort = pytest.importorskip("onnxruntime")
    from certify.audit import audit
    from data import load_dataset
    from training.loss import offset_cross_entropy

    digits = load_dataset("digits")
    x, y = digits.train_images.float().div(255), digits.train_labels
    model = create_model(method, "xxs", 1, 10, 8)
    opt = torch.optim.SGD(model.parameters(), lr=SMOKE_LR[method], momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = offset_cross_entropy(model(x[idx]), y[idx], offset=0.4, temperature=0.25)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, yt = digits.test_images.float().div(255), digits.test_labels
    with torch.no_grad():
        expected = model(xt)
    assert (expected.argmax(1) == yt).float().mean() > 0.5  # learned something in 60 steps

    plain = model.export().eval()
    path = tmp_path / f"{method}.onnx"
    torch.onnx.export(
        plain, (xt[:1],), str(path), input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=19,
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": xt.numpy()})[0]
    assert np.abs(got - expected.numpy()).max() <= 1e-4
    result = audit(plain, (1, 8, 8))
    assert 0.5 < result.bound <= 1 + 1e-4 and result.lower <= result.bound
    assert result.certificate == "linear_head"


# Counts on 3×32×32, 10 classes (the README's table): exact, from the layer shapes.
EXPECTED_PARAMS = {
    "aoc": {"xs": 919_488, "s": 3_671_936, "m": 14_675_712, "l": 58_678_784},
    "bro": {"xs": 787_648, "s": 3_144_576, "m": 12_566_272, "l": 50_241_024},
    "sandwich": {"xs": 3_144_091, "s": 12_565_275, "m": 50_239_003, "l": 200_911_899},
}


@pytest.mark.parametrize("method", NEW)
def test_parameter_counts(method):
    for size, expected in EXPECTED_PARAMS[method].items():
        with torch.device("meta"):
            model = create_model(method, size)
        assert sum(p.numel() for p in model.parameters()) == expected, size
