"""HH activation and distance pool (exact norms), and the LLN head's certificate under attack."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from certify.audit import audit
from certify.radius import certified_radius
from models.activations import HouseholderActivation
from models.blocks import MaxMin
from certify.artifact import certificate_kwargs, to_onnx, verify
from models.export import to_plain
from models.pooling import DistancePool
from models.registry import create_model
from tests.lipschitz_utils import feature_attack


def test_hh_jacobian_is_orthogonal_and_pi_over_2_is_maxmin():
    torch.manual_seed(0)
    act = HouseholderActivation(6).double()
    with torch.no_grad():
        act.theta.uniform_(0, 2 * math.pi)
    for _ in range(20):
        x = torch.randn(1, 6, 1, 1, dtype=torch.float64)
        j = torch.autograd.functional.jacobian(act, x).reshape(6, 6)
        torch.testing.assert_close(j.T @ j, torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)
    plain = act.export()
    x = torch.randn(5, 6, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(plain(x.float()), act(x).float(), atol=1e-6, rtol=1e-6)
    assert plain.lipschitz_upper_bound() <= 1 + 1e-6
    maxmin_like = HouseholderActivation(6)
    x = torch.randn(4, 6, 2, 2)
    torch.testing.assert_close(maxmin_like(x), MaxMin()(x), atol=1e-6, rtol=1e-6)


def test_hh_is_continuous_across_its_mirror():
    act = HouseholderActivation(2).double()
    v = torch.cat(act.mirror(), dim=1).reshape(2)
    t = torch.tensor([v[1].item(), -v[0].item()], dtype=torch.float64)  # on the mirror
    for eps in (1e-3, 1e-6, 1e-9):
        a = act((t + eps * v).reshape(1, 2, 1, 1))
        b = act((t - eps * v).reshape(1, 2, 1, 1))
        assert (a - b).norm() <= 2 * eps * (1 + 1e-9)


def brute_signed_distance(p, half_angle, n=200001):
    """Signed distance of a 2-D point to the cone ``|angle| <= a``, by dense boundary sampling."""
    r = torch.linspace(0, 10, n, dtype=torch.float64)
    edges = torch.cat([
        torch.stack([r * math.cos(half_angle), r * math.sin(half_angle)], 1),
        torch.stack([r * math.cos(half_angle), -r * math.sin(half_angle)], 1),
    ])
    d = (edges - p).norm(dim=1).min()
    inside = abs(math.atan2(p[1].item(), p[0].item())) <= half_angle
    return -d if inside else d


@pytest.mark.parametrize("theta", [0.0, 0.7, math.pi / 2, 2.5, math.pi, float(np.float32(math.pi))])
def test_distance_pool_is_the_signed_distance_and_1_lipschitz(theta):
    pool = DistancePool(2, theta=min(theta, math.pi)).double()
    with torch.no_grad():
        pool.theta.fill_(theta)
    a = pool.half_angle().item()
    gen = torch.Generator().manual_seed(0)
    pts = torch.randn(40, 2, generator=gen, dtype=torch.float64) * 2
    for p in pts[:12]:
        got = pool(p.reshape(1, 2, 1, 1)).item()
        assert abs(got - brute_signed_distance(p, a)) <= 1e-4
    for p in pts:
        j = torch.autograd.functional.jacobian(pool, p.reshape(1, 2, 1, 1)).reshape(-1)
        assert j.norm() <= 1 + 1e-4
    # close pairs straddling every region boundary: |d(p) − d(q)| <= ‖p − q‖
    q = pts + 1e-3 * torch.randn(pts.shape, generator=gen, dtype=torch.float64)
    dp = pool(pts.reshape(-1, 2, 1, 1)).flatten()
    dq = pool(q.reshape(-1, 2, 1, 1)).flatten()
    assert ((dp - dq).abs() <= (pts - q).norm(dim=1) * (1 + 1e-6)).all()
    # the interior of a half-plane is never sent down the apex branch (the θ = π jump)
    if theta >= math.pi - 1e-6:
        inside = torch.tensor([[3.0, 1e-9]], dtype=torch.float64)
        assert pool(inside.reshape(1, 2, 1, 1)).item() < 0
    plain = pool.export()
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(plain(x.float()), pool(x).float(), atol=1e-6, rtol=1e-6)
    assert plain.lipschitz_upper_bound() <= 1 + 1e-6


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="even channel count >= 2, got 3"):
        HouseholderActivation(3)
    with pytest.raises(ValueError, match="even channel count >= 2, got 5"):
        DistancePool(5)
    with pytest.raises(ValueError, match="theta must be in"):
        DistancePool(4, theta=4.0)


def test_options_network_audits_every_new_layer(tmp_path):
    torch.manual_seed(0)
    model = create_model("aol", "xxs", 1, 10, 8, head="lln", activation="hh", pool="distance")
    result = audit(to_plain(model), (1, 8, 8))
    types = {r.type for r in result.rows}
    assert {"PlainHouseholder", "PlainDistancePool", "PlainLLNHead"} <= types
    assert result.certificate == "linear_head" and result.body_bound <= 1 + 1e-6
    path = to_onnx(model, tmp_path / "m.onnx")
    meta = verify(path)
    w = model.head.head.normalized_weight().double()
    expected = (w[:, None] - w[None]).norm(dim=-1).detach().numpy()
    np.testing.assert_allclose(np.asarray(meta["head_distances"]), expected, atol=1e-6)


def test_generic_certificate_on_an_lln_head_is_caught_by_the_attack(tmp_path):
    """Antipodal unit rows: the linear-head radius is margin/2, the generic margin/√2 is wrong.

    The LLN head alone (the body's part of the bound is 1 by construction: the identity) is
    attacked in feature space; with a whole network the body's slack could hide the error.
    """
    from models.heads import PlainLLNHead

    w = torch.zeros(3, 4, dtype=torch.float64)
    w[0, 0], w[1, 0], w[2, 1] = 1.0, -1.0, 1.0
    head = PlainLLNHead(w, torch.tensor([0.0, 0.0, -100.0])).double()
    assert head.lipschitz_upper_bound() > 1.4  # not 1-Lipschitz as a whole
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    logits = head(h)
    y = logits.argmax(1)
    right = certified_radius(logits, 1.0, head=head.rows)
    generic = certified_radius(logits, 1.0)
    ok = right > 0
    assert ok.sum() > 50
    torch.testing.assert_close(generic[ok] / right[ok], torch.full_like(right[ok], math.sqrt(2)))
    assert (feature_attack(head, h[ok], y[ok], right[ok]) > 0).all()
    assert (feature_attack(head, h[ok], y[ok], generic[ok]) < 0).sum() > 0.9 * ok.sum()
    # A whole LipNet with an LLN head is certified the linear-head way, never generically.
    model = create_model("aol", "xxs", 1, 10, 8, head="lln")
    meta = verify(to_onnx(model, tmp_path / "lln.onnx"))
    assert meta["certificate"] == "linear_head"
    assert certificate_kwargs(meta)["lipschitz_bound"] == meta["lipschitz_bound_body"]
