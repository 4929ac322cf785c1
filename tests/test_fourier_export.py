"""The frequency-major export form of the FFT methods, and SOC's number of exported terms.

``FourierConv2d`` (Cayley, LOT, BRO, Sandwich at inference): exact against the float64 FFT on
odd, even and padded sizes; its bound is sound for stored buffers of no export at all (a
tampered combination falls back to a looser, still sound bound); its ONNX graph moves data only
by 2-D transposes. SOC: the default terms keep the truncation error below 1e-4 and the audit's
bound of the exported polynomial stays within it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from certify.rules import exp_polynomial_bound, layer_bound
from models import create_layer
from models.layers.soc import TRUNCATION_TOL, taylor_terms
from models.ops import apply_spectrum, circular_conv_spectrum
from models.plain import ConvExponential, FourierConv2d
from tests.lipschitz_utils import singular_values


def _module(n: int, pad: int, c: int = 3, seed: int = 0) -> tuple[FourierConv2d, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    kernel = torch.randn(c, c, 3, 3, dtype=torch.float64, generator=gen)
    q = circular_conv_spectrum(kernel, n + 2 * pad, onesided=True)
    return FourierConv2d(q, torch.randn(c, generator=gen), pad=pad), q


@pytest.mark.parametrize("n,pad", [(1, 0), (2, 1), (5, 0), (6, 0), (4, 1), (7, 2)])
def test_fourier_form_equals_the_fft_and_its_bound_is_tight(n, pad):
    module, q = _module(n, pad)
    x = torch.randn(4, 3, n, n, generator=torch.Generator().manual_seed(1))
    expected = apply_spectrum(F.pad(x.double(), (pad,) * 4), q)[..., pad : pad + n, pad : pad + n]
    expected = expected + module.bias.double().view(1, -1, 1, 1)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=0)
    exact = singular_values(copy.deepcopy(module), torch.zeros(1, 3, n, n)).max().item()
    bound = module.lipschitz_upper_bound()
    assert exact <= bound
    if pad == 0:  # the circular map itself: tight up to float32 storage
        assert bound <= exact * (1 + 1e-5)
    assert module.stage_factors().inverse_w is not None


@pytest.mark.parametrize("n,pad", [(4, 1), (8, 0), (16, 1), (6, 0)])
def test_fourier_buffers_hold_exact_zeros_not_float64_noise(n, pad):
    # Entries like cos(π/2) = 6e-17 or a self-conjugate bin's Im ≈ 1e-17 make float32 products
    # denormal, which ONNX Runtime on x86 computes many times slower (LOT S ran 1.5x slower).
    module, q = _module(n, pad, c=4)
    for name in ("dft_h", "dft_w", "idft_w", "blocks"):
        buf = getattr(module, name)
        tiny = (buf != 0) & (buf.abs() < 1e-12 * buf.abs().max())
        assert not tiny.any(), f"{name}: {int(tiny.sum())} entries of float64 noise"
    size, half = n + 2 * pad, (n + 2 * pad) // 2 + 1
    # The imaginary rows of the self-conjugate bins (0, and N/2 for even N) are exactly 0 ...
    assert (module.dft_h[1] == 0).all() and (size % 2 or (module.dft_h[2 * half - 1] == 0).all())
    # ... and so is Im Q at the zero frequency of a real kernel, stored as blocks[0, 1].
    assert (module.blocks[0, 1] == 0).all() and q[0, 0].imag.abs().max() < 1e-12


def test_fourier_bound_stays_sound_when_the_combination_is_tampered_with():
    module, _ = _module(5, 0)
    with torch.no_grad():
        module.idft_w[:, 1::4] *= 1.5  # P01's columns no longer copy P10's
    assert module.stage_factors().inverse_w is None
    exact = singular_values(copy.deepcopy(module), torch.zeros(1, 3, 5, 5)).max().item()
    assert exact <= module.lipschitz_upper_bound()
    with torch.no_grad():
        module.dft_h.mul_(2)  # the forward and the inverse stage both read dft_h
    exact = singular_values(copy.deepcopy(module), torch.zeros(1, 3, 5, 5)).max().item()
    assert exact <= module.lipschitz_upper_bound()


def test_fourier_graph_moves_data_by_2d_transposes_only(tmp_path):
    onnx = pytest.importorskip("onnx")
    module, _ = _module(4, 1, c=2)
    path = tmp_path / "fourier.onnx"
    torch.onnx.export(
        module, (torch.zeros(2, 2, 4, 4),), str(path), input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=19, dynamo=False,
    )
    nodes = onnx.load(str(path)).graph.node
    ops = [node.op_type for node in nodes]
    assert ops.count("MatMul") == 5 and not {"Pad", "Slice"} & set(ops)  # pad, crop folded in
    perms = [list(a.ints) for node in nodes if node.op_type == "Transpose" for a in node.attribute]
    assert perms and all(p == [1, 0] for p in perms)


def test_taylor_terms_meet_the_tolerance_with_the_fewest_terms():
    def tail(norm: float, t: int) -> float:
        return norm ** (t + 1) / math.factorial(t + 1) * math.exp(norm)

    for norm in (0.3, 0.7, 1.0, 2.1):
        terms = taylor_terms(norm)
        assert tail(norm, terms) <= TRUNCATION_TOL < tail(norm, terms - 1)
    taylor = {"series": "taylor"}
    assert [create_layer("soc", 4, k, **taylor).eval_terms for k in (1, 3)] == [7, 6]
    assert create_layer("soc", 4, 3, bound="paper", **taylor).eval_terms == 12
    assert create_layer("soc", 4, 3, eval_terms=9).eval_terms == 9


def test_chebyshev_terms_are_fewer_for_the_same_tolerance():
    # Evaluation at 1e-4, training at 2e-3: k = 1 (a = 1), k = 3 (a = 0.7), paper scaling (2.1).
    layers = [create_layer("soc", 4, k) for k in (1, 3)] + [
        create_layer("soc", 4, 3, bound="paper")
    ]
    assert [(m.eval_terms, m.train_terms) for m in layers] == [(5, 4), (4, 3), (7, 6)]
    assert create_layer("soc", 4, 3, series="taylor").train_terms == 5


@pytest.mark.parametrize("series,terms", [("chebyshev", 4), ("taylor", 6)])
def test_soc_export_truncation_error_and_audited_bound(series, terms):
    layer = create_layer("soc", 4, 3, series=series).eval()
    plain = layer.export()
    assert isinstance(plain, ConvExponential) and plain.terms == terms
    assert (plain.horner is None) == (series == "taylor")
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), layer(x), atol=1e-6, rtol=0)
    # The truncation error against the exact exponential of the exported skew operator.
    sv = singular_values(copy.deepcopy(plain), torch.zeros(1, 4, 6, 6))
    assert (sv - 1).abs().max().item() <= TRUNCATION_TOL
    bound, _ = layer_bound(plain, (4, 6, 6))
    assert sv.max().item() <= bound <= 1 + TRUNCATION_TOL
    assert exp_polynomial_bound(plain.coefficients(), 0.7) <= 1 + TRUNCATION_TOL
