"""SOC's exponential polynomials (models/exp_series.py), their audit, and files from before them."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch

from certify.artifact import load, to_onnx
from certify.artifact.format import encode_value
from certify.artifact.structure import legacy_configs
from certify.rules import exp_polynomial_bound
from models.exp_series import (
    bessel_j,
    chebyshev_t,
    coefficients_from_ratios,
    exp_coefficients,
    fewest_terms,
    horner_ratios,
    truncation_error,
)
from models.plain import ConvExponential
from models.registry import create_model


def test_bessel_and_chebyshev_building_blocks():
    # J_0(1), J_1(1), J_2(0.7) from tables (Abramowitz & Stegun 9.1).
    assert bessel_j(0, 1.0) == pytest.approx(0.7651976865579666, abs=1e-15)
    assert bessel_j(1, 1.0) == pytest.approx(0.4400505857449335, abs=1e-15)
    assert bessel_j(2, 0.7) == pytest.approx(0.0587869443641569, abs=1e-13)
    assert chebyshev_t(4) == [1, 0, -8, 0, 8]  # T_4 = 8t⁴ − 8t² + 1
    t = np.linspace(-1, 1, 11)
    np.testing.assert_allclose(
        np.polyval(chebyshev_t(5)[::-1], t), np.cos(5 * np.arccos(t)), atol=1e-12
    )


def test_chebyshev_beats_taylor_at_every_degree_on_the_segment():
    for terms in range(2, 7):
        cheb = truncation_error(exp_coefficients("chebyshev", terms, 0.7), 0.7)
        taylor = truncation_error(exp_coefficients("taylor", terms, 0.7), 0.7)
        assert cheb < taylor / 3
    # The error is what the expansion's tail promises: 2 Σ_{k>T} |J_k(a)|.
    tail = 2 * sum(abs(bessel_j(k, 0.7)) for k in range(5, 30))
    assert truncation_error(exp_coefficients("chebyshev", 4, 0.7), 0.7) <= tail * 1.2
    assert fewest_terms("chebyshev", 0.7, 1e-4, 12) == 4
    assert fewest_terms("taylor", 0.7, 1e-4, 12) == 6


def test_chebyshev_coefficients_approach_the_exponential_series():
    coeffs = exp_coefficients("chebyshev", 10, 0.7)
    exact = [1 / math.factorial(k) for k in range(11)]
    np.testing.assert_allclose(coeffs[:7], exact[:7], rtol=1e-5)
    np.testing.assert_allclose(coeffs, exact, rtol=0.02)
    assert exp_coefficients("taylor", 3, 0.7) == [1.0, 1.0, 0.5, 1 / 6]


def test_ratio_form_round_trip_and_bad_input():
    coeffs = exp_coefficients("chebyshev", 5, 0.7)
    np.testing.assert_allclose(coefficients_from_ratios(horner_ratios(coeffs)), coeffs, rtol=1e-15)
    with pytest.raises(ValueError, match="unknown series 'pade'; choose from taylor, chebyshev"):
        exp_coefficients("pade", 3, 0.7)
    with pytest.raises(ValueError, match="norm in \\(0, 3\\], got 5"):
        exp_coefficients("chebyshev", 3, 5)
    with pytest.raises(ValueError, match="non-zero coefficients"):
        horner_ratios([1.0, 0.0, 0.5])


@pytest.mark.parametrize("series,terms", [("chebyshev", 3), ("chebyshev", 4), ("taylor", 4)])
def test_polynomial_bound_holds_on_dense_skew_matrices(series, terms):
    """‖p(A + S)‖ ≤ exp_polynomial_bound(c, ‖A‖, ‖S‖), and tight for S = 0."""
    coeffs = exp_coefficients(series, terms, 0.7)
    gen = torch.Generator().manual_seed(terms)
    for s_norm in (0.0, 1e-3):
        w = torch.randn(12, 12, generator=gen, dtype=torch.float64)
        a = w - w.T
        a *= 0.7 / torch.linalg.matrix_norm(a, ord=2)
        sym = torch.randn(12, 12, generator=gen, dtype=torch.float64)
        sym = s_norm * (sym + sym.T) / max(torch.linalg.matrix_norm(sym + sym.T, ord=2), 1e-30)
        m = a + sym
        p = sum(c * torch.linalg.matrix_power(m, k) for k, c in enumerate(coeffs))
        norm = float(torch.linalg.matrix_norm(p, ord=2))
        bound = exp_polynomial_bound(coeffs, 0.7, s_norm)
        assert norm <= bound
        if s_norm == 0:
            lam = np.linspace(0, 0.7, 100001)
            assert bound - float(np.abs(np.polyval(coeffs[::-1], 1j * lam)).max()) < 1e-5
    assert exp_polynomial_bound(terms, 0.7) == exp_polynomial_bound(
        exp_coefficients("taylor", terms, 0.7), 0.7
    )


def test_audit_reads_the_stored_ratios_not_the_config():
    kernel = torch.zeros(2, 2, 3, 3)
    kernel[0, 1, 1, 1], kernel[1, 0, 1, 1] = 0.5, -0.5  # a 1×1 skew map, ‖L‖ = 0.5
    plain = ConvExponential(kernel, 2, ratios=(1.0, 1.0, 0.5))
    assert plain.coefficients() == [1.0, 1.0, 0.5]
    inflated = ConvExponential(kernel, 2, ratios=(2.0, 1.0, 0.5))  # a tampered c₀
    a = 0.5
    assert exp_polynomial_bound(inflated.coefficients(), a) > 1.9
    with pytest.raises(ValueError, match="2 terms need 3 ratios, got 2"):
        ConvExponential(kernel, 2, ratios=(1.0, 1.0))


def _set_config(path, config) -> None:
    proto = onnx.load(str(path))
    for entry in proto.metadata_props:
        if entry.key == "config":
            entry.value = encode_value(config)
    onnx.save(proto, str(path))


def test_files_exported_with_the_old_taylor_default_still_load(tmp_path):
    """A SOC file written before the Chebyshev default stores no ``series``: it is the Taylor graph.

    The loader tries the stored config, then the config with the earlier default spelled out;
    each under the same strict structure check.
    """
    torch.manual_seed(0)
    model = create_model("soc", "xxs", 1, 10, 8, layer_options={"series": "taylor"})
    path = to_onnx(model, tmp_path / "soc.onnx", metadata=dict(dataset="digits"))
    config = dict(model.config, layer_options={})  # what such a file stores
    assert legacy_configs(config) == [dict(config, layer_options={"series": "taylor"})]
    _set_config(path, config)
    artifact = load(path)
    exps = [m for m in artifact.twin.modules() if isinstance(m, ConvExponential)]
    assert exps and all(m.horner is None and m.terms in (6, 7) for m in exps)  # k = 3, 1
    # An explicit option is never overridden (then only the stored config is tried).
    assert legacy_configs(dict(config, layer_options={"series": "chebyshev"})) == []


def test_chebyshev_soc_file_loads_and_stores_its_ratios(tmp_path):
    torch.manual_seed(0)
    model = create_model("soc", "xxs", 1, 10, 8)
    path = to_onnx(model, tmp_path / "soc.onnx", metadata=dict(dataset="digits"))
    artifact = load(path)
    exps = [m for m in artifact.twin.modules() if isinstance(m, ConvExponential)]
    assert exps and all(m.horner is not None and m.terms in (4, 5) for m in exps)
    names = {i.name for i in onnx.load(str(path)).graph.initializer}
    assert any(n.endswith("horner") for n in names)
    assert 1.0 <= artifact.audit.body_bound < 1.001
