"""Polynomials that approximate ``exp`` on a skew-symmetric operator (SOC's exponential).

SOC needs ``exp(L)`` for a skew-symmetric ``L`` with ``‖L‖ ≤ a`` and evaluates a polynomial
``p(L)`` instead. ``L`` is normal with eigenvalues ``iλ``, ``λ ∈ [−a, a]``, so the error
``‖p(L) − exp(L)‖`` is ``max_{|λ|≤a} |p(iλ) − e^{iλ}|``: only the segment ``[−ia, ia]`` matters,
not the disc of radius ``a`` that the Taylor polynomial is made for. Two series:

- ``"taylor"``: ``p(z) = Σ_{k≤T} zᵏ/k!`` (Singla & Feizi, "Skew Orthogonal Convolutions", ICML
  2021). Error at most ``a^{T+1}/(T+1)! · eᵃ``.
- ``"chebyshev"``: the degree-``T`` truncation of the Chebyshev expansion of ``e^{iat}`` on
  ``t ∈ [−1, 1]``, ``e^{iat} = J₀(a) + 2 Σ_{k≥1} iᵏ Jₖ(a) Tₖ(t)`` (the Jacobi–Anger expansion),
  rewritten in powers of ``z = iat``. Its coefficients are real (``Tₖ`` has the parity of ``k``)
  and close to ``1/k!``. Error at most ``2 Σ_{k>T} |Jₖ(a)| ≲ 2 (a/2)^{T+1}/(T+1)!``: about
  ``2^T`` times smaller than Taylor's, so at SOC's ``a = 0.7`` and a tolerance of ``1e-4`` it
  needs 4 terms where Taylor needs 6 (3 terms: 1.2e-3, against Taylor's 9.9e-3 at 3).

Only the quality of the approximation depends on this choice. Soundness does not: the audit bounds
the polynomial that is exported, ``max_{|λ|≤‖L‖} |p(iλ)|``, whatever its coefficients
(:func:`certify.rules.exp_polynomial_bound`).

Polynomials are evaluated in the *ratio Horner form* ``p(z) = c₀(1 + r₁z(1 + r₂z(⋯(1 + r_T z))))``
with ``r_i = c_i / c_{i−1}``: ``u ← x + r_i L u`` for ``i = T … 1``, then ``y = c₀u``. For Taylor
``c₀ = 1`` and ``r_i = 1/i``, the form SOC has always used.
"""

from __future__ import annotations

import functools
import math

import numpy as np

SERIES = ("taylor", "chebyshev")
#: Points of the grid on ``[0, a]`` where :func:`truncation_error` evaluates the error.
_GRID = 1 << 14


def _check_series(series: str) -> None:
    if series not in SERIES:
        raise ValueError(f"unknown series {series!r}; choose from {', '.join(SERIES)}")


def bessel_j(k: int, a: float) -> float:
    """``J_k(a)`` by its power series (``0 ≤ a ≤ 3``: 40 terms are exact to double precision)."""
    half = a / 2.0
    return math.fsum(
        (-1) ** m * half ** (2 * m + k) / (math.factorial(m) * math.factorial(m + k))
        for m in range(40)
    )


def chebyshev_t(k: int) -> list[int]:
    """Integer coefficients of the Chebyshev polynomial ``T_k`` (index = power)."""
    prev, cur = [1], [0, 1]
    if k == 0:
        return prev
    for _ in range(k - 1):
        nxt = [0] * (len(cur) + 1)
        for j, c in enumerate(cur):
            nxt[j + 1] += 2 * c
        for j, c in enumerate(prev):
            nxt[j] -= c
        prev, cur = cur, nxt
    return cur


def exp_coefficients(series: str, terms: int, norm: float) -> list[float]:
    """Coefficients ``c_0 … c_T`` (index = power) of the series' polynomial.

    Args:
        series: ``"taylor"`` or ``"chebyshev"``.
        terms: ``T >= 0``, the degree.
        norm: ``a > 0``, the bound of ``‖L‖`` the Chebyshev polynomial is made for (unused by
            Taylor).

    Raises:
        ValueError: unknown series, ``terms < 0``, or ``norm`` outside ``(0, 3]`` for Chebyshev.
    """
    _check_series(series)
    if terms < 0:
        raise ValueError(f"terms must be >= 0, got {terms}")
    if series == "taylor":
        return [1.0 / math.factorial(i) for i in range(terms + 1)]
    if not 0 < norm <= 3:
        raise ValueError(f"the Chebyshev series needs a norm in (0, 3], got {norm!r}")
    coeffs = [0.0] * (terms + 1)
    for k in range(terms + 1):
        weight = bessel_j(k, norm) * (1 if k == 0 else 2)
        for j, t in enumerate(chebyshev_t(k)):
            if t:  # iᵏ t (z / (ia))ʲ = (−1)^((k−j)/2) t zʲ / aʲ, k − j even
                coeffs[j] += weight * t * (-1) ** ((k - j) // 2) / norm**j
    return coeffs


def horner_ratios(coeffs: list[float]) -> list[float]:
    """``[c₀, r₁, …, r_T]`` with ``r_i = c_i / c_{i−1}`` (the ratio Horner form).

    Raises:
        ValueError: a zero coefficient (the ratio form needs every ``c_i ≠ 0``).
    """
    if any(c == 0 for c in coeffs):
        raise ValueError(f"the ratio Horner form needs non-zero coefficients, got {coeffs}")
    return [coeffs[0]] + [coeffs[i] / coeffs[i - 1] for i in range(1, len(coeffs))]


def coefficients_from_ratios(ratios: list[float]) -> list[float]:
    """Inverse of :func:`horner_ratios`: ``c_k = c₀ · r₁ ⋯ r_k``."""
    coeffs = [float(ratios[0])]
    for r in ratios[1:]:
        coeffs.append(coeffs[-1] * float(r))
    return coeffs


def truncation_error(coeffs: list[float], norm: float) -> float:
    """``max_{|λ|≤a} |p(iλ) − e^{iλ}|``, on a grid padded by its spacing times the slope bound.

    The slope of ``λ ↦ p(iλ) − e^{iλ}`` is ``|p′(iλ) − e^{iλ}|``, at most
    ``Σ_{k<T} |(k+1)c_{k+1} − 1/k!| aᵏ + (eᵃ − Σ_{k<T} aᵏ/k!)`` (compare the two series term by
    term): about 1e-2 for a polynomial close to ``exp``, so a coarse grid is tight. Real
    coefficients make ``|p(−iλ) − e^{−iλ}|`` equal to ``|p(iλ) − e^{iλ}|``, so ``[0, a]`` suffices.
    """
    lam = np.linspace(0.0, norm, _GRID)
    z = 1j * lam
    val = np.zeros_like(z)
    for c in reversed(coeffs):
        val = val * z + c
    terms = len(coeffs) - 1
    slope = sum(
        abs((k + 1) * coeffs[k + 1] - 1 / math.factorial(k)) * norm**k for k in range(terms)
    ) + (math.exp(norm) - sum(norm**k / math.factorial(k) for k in range(terms)))
    return float(np.abs(val - np.exp(z)).max()) + 0.5 * norm / (_GRID - 1) * slope


@functools.lru_cache(maxsize=64)
def fewest_terms(series: str, norm: float, tol: float, max_terms: int) -> int:
    """Fewest ``T ≤ max_terms`` with the series' error at most ``tol`` on ``‖L‖ ≤ norm``.

    Taylor uses the a-priori remainder bound ``Σ_{i>T} aⁱ/i! ≤ a^{T+1}/(T+1)! · eᵃ``;
    Chebyshev its measured :func:`truncation_error`. ``max_terms`` if none reaches ``tol``.
    """
    _check_series(series)
    for terms in range(1, max_terms):
        if series == "taylor":
            err = norm ** (terms + 1) / math.factorial(terms + 1) * math.exp(norm)
        else:
            err = truncation_error(exp_coefficients(series, terms, norm), norm)
        if err <= tol:
            return terms
    return max_terms


__all__ = [
    "SERIES",
    "bessel_j",
    "chebyshev_t",
    "coefficients_from_ratios",
    "exp_coefficients",
    "fewest_terms",
    "horner_ratios",
    "truncation_error",
]
