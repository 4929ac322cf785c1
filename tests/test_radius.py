"""Certified radii: hand-computed values, ties, non-finite logits, the head certificate, slack."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from certify.radius import (
    STANDARD_EPS,
    certified_accuracy,
    certified_radius,
    eps_key,
    float_slack,
    head_row_distances,
)


def exact_generic(z: np.ndarray, bound: float = 1.0) -> np.ndarray:
    s = np.sort(z, axis=1)
    return (s[:, -1] - s[:, -2]) / (math.sqrt(2) * bound)


def test_hand_computed_generic():
    z = np.array([[3.0, 1.0, 0.0], [0.0, 0.5, 2.0]])
    r = certified_radius(z)
    assert isinstance(r, np.ndarray) and r.dtype == np.float64
    np.testing.assert_allclose(r, [2 / math.sqrt(2), 1.5 / math.sqrt(2)], rtol=2e-3)


def test_slack_makes_radius_slightly_smaller():
    z = np.array([[3.0, 1.0, 0.0], [10.0, -2.0, 9.0]])
    r = certified_radius(z)
    exact = exact_generic(z)
    assert (r < exact).all()
    # slack = 2^-12 (|z_y| + |z_j|) + 2^-12
    slack = 2.0**-12 * (np.array([3.0 + 1.0, 10.0 + 9.0])) + 2.0**-12
    np.testing.assert_allclose(r, (np.array([2.0, 1.0]) - slack) / math.sqrt(2), rtol=1e-12)
    assert (exact - r < 1e-2 * exact).all()


def test_bound_divides():
    z = torch.tensor([[3.0, 1.0, 0.0]])
    r1 = certified_radius(z, lipschitz_bound=1.0)
    r4 = certified_radius(z, lipschitz_bound=4.0)
    assert torch.is_tensor(r1)
    torch.testing.assert_close(r4 * 4, r1, rtol=1e-12, atol=0)


def test_ties_give_zero():
    z = np.array([[2.0, 2.0, 0.0], [0.0, 5.0, 5.0], [1.0, 1.0, 1.0]])
    assert (certified_radius(z) == 0).all()
    dist = head_row_distances(np.eye(3))
    assert (certified_radius(z, head_distances=dist) == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_gives_zero(bad):
    z = np.array([[5.0, 0.0, bad], [5.0, 0.0, 0.0]])
    r = certified_radius(z)
    assert r[0] == 0 and r[1] > 0
    acc = certified_accuracy(z, np.array([0, 0]), eps_list=[0.1])
    assert acc["clean"] == 0.5 and acc[eps_key(0.1)] == 0.5


def test_one_class_far_ahead():
    z = np.array([[1000.0] + [0.0] * 9])
    r = certified_radius(z)
    assert r[0] == pytest.approx(1000 / math.sqrt(2), rel=1e-3)
    assert certified_accuracy(z, [0])[eps_key(1.0)] == 1.0
    assert certified_accuracy(z, [1])[eps_key(1.0)] == 0.0


def test_head_certificate_at_least_generic():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(10, 20, generator=gen, dtype=torch.float64)
    w = w / torch.linalg.matrix_norm(w, ord=2)  # ‖W‖₂ = 1
    h = torch.randn(200, 20, generator=gen, dtype=torch.float64)
    z = h @ w.T
    generic = certified_radius(z, lipschitz_bound=1.0)
    head = certified_radius(z, lipschitz_bound=1.0, head=w)
    via_dist = certified_radius(z, lipschitz_bound=1.0, head_distances=head_row_distances(w))
    torch.testing.assert_close(head, via_dist)
    assert (head >= generic - 1e-12).all()
    assert (head > generic).float().mean() > 0.5


def test_head_certificate_hand_computed():
    w = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.0]])
    z = np.array([[2.0, 1.0, 1.0]])  # rows differ by √2 (class 1) and 0.5 (class 2)
    r = certified_radius(z, head=w, lipschitz_bound=2.0)
    exact = min(1.0 / (2 * math.sqrt(2)), 1.0 / (2 * 0.5))
    assert r[0] == pytest.approx(exact, rel=1e-3) and r[0] < exact


def test_slack_is_tiny_and_positive():
    f64 = torch.float64
    s = float_slack(torch.tensor([10.0], dtype=f64), torch.tensor([-3.0], dtype=f64))
    assert 0 < float(s) < 1e-2


def test_certified_accuracy_strict_and_keys():
    z = np.array([[1.0, 0.0], [0.0, 3.0]])
    acc = certified_accuracy(z, [0, 1])
    assert set(acc) == {"clean", *(eps_key(e) for e in STANDARD_EPS)}
    assert acc["clean"] == 1.0
    r = certified_radius(z)
    assert certified_accuracy(z, [0, 1], eps_list=[float(r[0])])[eps_key(float(r[0]))] <= 0.5


def test_bad_inputs():
    with pytest.raises(ValueError, match="lipschitz_bound"):
        certified_radius(np.zeros((1, 3)), lipschitz_bound=0.0)
    with pytest.raises(ValueError, match="logits"):
        certified_radius(np.zeros((2, 1)))
    with pytest.raises(ValueError, match="labels"):
        certified_accuracy(np.zeros((2, 3)), [0])
