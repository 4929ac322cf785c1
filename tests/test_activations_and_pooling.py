"""The HH activation and the distance pool (``models/activations.py``, ``models/pooling.py``).

Exact checks in float64 on tiny inputs: the HH Jacobian is orthogonal and the distance pool is the
signed distance to its cone (against an independent reference and a brute-force one) with
unit-norm gradients and no jump at any region boundary, in the training and the exported form;
bad channel counts, angles and names are refused with the value named.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from models.activations import HouseholderActivation, PlainHouseholder, create_activation
from models.blocks import MaxMin
from models.network import LipNet
from models.pooling import DistancePool, PlainDistancePool, create_pool
from tests.lipschitz_utils import jacobian_matrix

F32_PI = float(np.float32(math.pi))  # > π: what a float32 θ = π really holds
POOL_THETAS = (0.0, 0.7, math.pi / 2, 2.5, math.pi, F32_PI)


# -- helpers -----------------------------------------------------------------------------------
def hh(theta: torch.Tensor) -> HouseholderActivation:
    """A float64 HH activation with the given per-pair angles."""
    act = HouseholderActivation(2 * theta.numel()).double()
    with torch.no_grad():
        act.theta.copy_(theta.reshape(act.theta.shape))
    return act


def mirror_products(act: HouseholderActivation, x: torch.Tensor) -> torch.Tensor:
    """``vᵀz`` of every channel pair of ``x``: its sign picks the branch."""
    vx, vy = act.mirror()
    a, b = x.chunk(2, dim=1)
    return a * vx + b * vy


def pool_pair(theta: float) -> tuple[DistancePool, PlainDistancePool]:
    """One-pair pools at ``theta``: the float64 training module and the exported one in float64.

    The exported one comes from a float32 module (as in a real network), so at ``θ = π`` its
    stored ``cos(θ/2)`` is the float32 rounding, ``-4.4e-8``: the slightly reflex case.
    """
    module = DistancePool(2).double()
    f32 = DistancePool(2)
    with torch.no_grad():
        module.theta.fill_(theta)
        f32.theta.fill_(theta)
    return module, f32.export().double()


def cone_of(pool: torch.nn.Module) -> tuple[float, float]:
    """``(cos a, sin a)`` of the convex cone a pool measures the distance to (float64).

    A float32 ``θ = π`` gives ``cos(θ/2) = −4.4e-8``: the edge normals then swap roles and the
    layer's formula is the signed distance to the *convex* cone with ``cos a = +4.4e-8``, not to
    the reflex set ``|angle| <= θ/2`` (they differ by ~4e-8·‖p‖). Hence ``|cos a|``.
    """
    if isinstance(pool, DistancePool):
        a = pool.half_angle().detach()
        return abs(float(torch.cos(a))), float(torch.sin(a))
    return abs(float(pool.cos_a)), float(pool.sin_a)


def reference_signed_distance(p: torch.Tensor, cos_a: float, sin_a: float) -> torch.Tensor:
    """Signed distance of points ``(N, 2)`` to ``K = {|angle| <= a}``, from its definition.

    Not the layer's formulas: the distance to each boundary ray ``{t·u : t >= 0}`` is
    ``‖p − max(0, ⟨p, u⟩)·u‖``; ``dist(p, K)`` outside and ``−dist(p, ∂K)`` inside is the smaller
    of the two, with the sign from ``atan2``.
    """
    norm = math.hypot(cos_a, sin_a)
    rays = torch.tensor([[cos_a, sin_a], [cos_a, -sin_a]], dtype=torch.float64) / norm
    t = (p @ rays.T).clamp_min(0)  # (N, 2): foot of p on each ray
    dist = (p[:, None, :] - t[..., None] * rays[None]).norm(dim=-1).min(dim=1).values
    inside = torch.atan2(p[:, 1], p[:, 0]).abs() <= math.atan2(sin_a, cos_a)
    return torch.where(inside, -dist, dist)


def sampled_signed_distance(p: torch.Tensor, cos_a: float, sin_a: float) -> torch.Tensor:
    """The same by dense sampling of the boundary (checks the reference itself), ~1e-5 accurate."""
    r = torch.linspace(0, 8, 400001, dtype=torch.float64)
    norm = math.hypot(cos_a, sin_a)
    edge = torch.cat([
        torch.stack([r * cos_a, r * sin_a], 1), torch.stack([r * cos_a, -r * sin_a], 1)
    ]) / norm
    dist = torch.cdist(p, edge).min(dim=1).values
    inside = torch.atan2(p[:, 1], p[:, 0]).abs() <= math.atan2(sin_a, cos_a)
    return torch.where(inside, -dist, dist)


def region_points(
    cos_a: float, sin_a: float, n: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """``n`` points strictly inside each region of the cone that has an interior.

    Regions: inside the cone, the two edge regions (nearest point on an edge), the apex region
    (nearest point the apex, the polar cone). Angles keep 1e-3 away from the region boundaries.
    """
    a = math.atan2(sin_a, cos_a)
    spans = {
        "inside": (-a, a),
        "edge+": (a, a + math.pi / 2),
        "edge-": (-a - math.pi / 2, -a),
        "apex": (a + math.pi / 2, 3 * math.pi / 2 - a),
    }
    out = {}
    for name, (lo, hi) in spans.items():
        if hi - lo <= 2e-3:
            continue  # no interior: θ = 0 has no inside, θ = π no apex region
        phi = lo + 1e-3 + (hi - lo - 2e-3) * torch.rand(n, generator=gen, dtype=torch.float64)
        r = 0.1 + 3 * torch.rand(n, generator=gen, dtype=torch.float64)
        out[name] = torch.stack([r * torch.cos(phi), r * torch.sin(phi)], 1)
    return out


def boundary_angles(cos_a: float, sin_a: float) -> list[float]:
    """Angles where the pool switches formula: the edges, the apex seams, and both axes."""
    a = math.atan2(sin_a, cos_a)
    return [a, -a, a + math.pi / 2, -a - math.pi / 2, 0.0, math.pi]


def as_pairs(p: torch.Tensor) -> torch.Tensor:
    return p.reshape(-1, 2, 1, 1)


# -- HH activation -----------------------------------------------------------------------------
def test_hh_jacobian_is_orthogonal_off_the_mirror():
    gen = torch.Generator().manual_seed(0)
    used, branches = 0, torch.zeros(2)
    for _ in range(12):
        act = hh(torch.rand(3, generator=gen, dtype=torch.float64) * 4 * math.pi - math.pi)
        x = torch.randn(1, 6, 2, 2, generator=gen, dtype=torch.float64)
        s = mirror_products(act, x)
        if s.abs().min() < 1e-3:  # too close to the seam for a clean Jacobian
            continue
        used += 1
        branches += torch.stack([(s > 0).sum(), (s < 0).sum()])
        j = jacobian_matrix(act, x)  # (24, 24)
        torch.testing.assert_close(j.T @ j, torch.eye(24, dtype=torch.float64), atol=1e-9, rtol=0)
    assert used >= 8
    assert (branches > 10).all()  # both the identity and the reflection were tested


def test_hh_at_pi_over_2_is_maxmin():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 8, 3, 3, generator=gen, dtype=torch.float64)
    act = hh(torch.full((4,), math.pi / 2, dtype=torch.float64))
    torch.testing.assert_close(act(x), MaxMin()(x), atol=1e-12, rtol=0)
    # The float32 default (the initialization) and its export: MaxMin up to float32 rounding.
    default = HouseholderActivation(8)
    torch.testing.assert_close(default(x.float()), MaxMin()(x.float()), atol=1e-6, rtol=0)
    torch.testing.assert_close(default.export()(x.float()), MaxMin()(x.float()), atol=1e-6, rtol=0)
    assert isinstance(create_activation("hh", 8), HouseholderActivation)
    assert isinstance(create_activation("maxmin", 8), MaxMin)


def test_hh_is_continuous_and_1_lipschitz_across_the_mirror():
    gen = torch.Generator().manual_seed(2)
    for theta in (0.0, 0.3, math.pi / 2, 2.0, math.pi, 5.0):
        act = hh(torch.tensor([theta], dtype=torch.float64))
        vx, vy = (t.item() for t in act.mirror())
        on = torch.tensor([vy, -vx], dtype=torch.float64) * 2.5  # vᵀt = 0: on the mirror
        v = torch.tensor([vx, vy], dtype=torch.float64)
        at = act(as_pairs(on)).flatten()
        torch.testing.assert_close(at, on, atol=1e-15, rtol=0)  # both branches give t there
        for eps in (1e-2, 1e-6, 1e-10):
            front = act(as_pairs(on + eps * v)).flatten()
            back = act(as_pairs(on - eps * v)).flatten()
            # float64 rounding of the O(1) coordinates adds ~1e-15 to any difference
            assert (front - at).norm() <= eps * (1 + 1e-9) + 1e-14
            assert (back - at).norm() <= eps * (1 + 1e-9) + 1e-14
            p = on + eps * torch.randn(200, 2, generator=gen, dtype=torch.float64)
            q = on + eps * torch.randn(200, 2, generator=gen, dtype=torch.float64)
            moved = (act(as_pairs(p)) - act(as_pairs(q))).flatten(1).norm(dim=1)
            assert (moved <= (p - q).norm(dim=1) * (1 + 1e-9) + 1e-14).all()


def test_hh_preserves_gradient_norm():
    gen = torch.Generator().manual_seed(3)
    act = hh(torch.rand(4, generator=gen, dtype=torch.float64) * 2 * math.pi)
    x = torch.randn(3, 8, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 8, 4, 4, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((act(x) * g).sum(), x)
    norms, expected = grad.flatten(1).norm(dim=1), g.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, expected, atol=1e-12, rtol=0)
    # The angles learn (the gradient reaches θ).
    (g_theta,) = torch.autograd.grad((act(x) * g).sum(), act.theta)
    assert g_theta.abs().min() > 0


def test_hh_export_equals_training_module_and_its_bound_is_honest():
    gen = torch.Generator().manual_seed(4)
    act = HouseholderActivation(6)
    with torch.no_grad():
        act.theta.uniform_(-3, 9, generator=gen)
    plain = act.export()
    assert isinstance(plain, PlainHouseholder)
    x = torch.randn(7, 6, 3, 3, generator=gen)
    torch.testing.assert_close(plain(x), act(x), atol=1e-6, rtol=0)
    assert 1.0 <= plain.lipschitz_upper_bound() <= 1 + 1e-6
    # Non-unit normals (not reachable by training): the bound follows the Jacobian I − 2vvᵀ.
    big = PlainHouseholder(torch.tensor([2.0]), torch.tensor([0.0])).double()
    assert big.lipschitz_upper_bound() == pytest.approx(7.0, rel=1e-9)  # |1 − 2·‖v‖²|
    j = torch.autograd.functional.jacobian(big, torch.tensor([[-1.0, 0.3]], dtype=torch.float64))
    assert torch.linalg.matrix_norm(j.reshape(2, 2), ord=2) <= big.lipschitz_upper_bound()
    assert torch.linalg.matrix_norm(j.reshape(2, 2), ord=2) == pytest.approx(7.0, rel=1e-9)


@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 5)])
def test_hh_and_pool_take_any_rank(shape):
    """Regression: a (B, C) or (B, C, L) input used to broadcast against the (1, c/2, 1, 1)
    parameters into a (1, c/2, B, c/2)-like garbage tensor instead of raising or working."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen)
    act, pool = HouseholderActivation(6), DistancePool(6)
    with torch.no_grad():
        act.theta.uniform_(0, 6, generator=gen)
        pool.theta.uniform_(0, 3, generator=gen)
    as4d = x.reshape(shape[0], 6, -1, 1)
    for module in (act, act.export(), pool, pool.export()):
        out = module(x)
        assert out.shape[0] == shape[0] and out.shape[2:] == x.shape[2:]
        torch.testing.assert_close(out, module(as4d).reshape(out.shape), atol=0, rtol=0)
    torch.testing.assert_close(HouseholderActivation(6)(x), MaxMin()(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels", [0, 1, 3, -2, 2.0])
def test_hh_rejects_bad_channel_counts(channels):
    with pytest.raises(ValueError, match=re.escape(f"got {channels!r}")):
        HouseholderActivation(channels)


def test_hh_rejects_bad_inputs_and_names():
    act = HouseholderActivation(6)
    with pytest.raises(ValueError, match=re.escape("(4, 4, 2, 2)")):
        act(torch.zeros(4, 4, 2, 2))
    with pytest.raises(ValueError, match="'relu'.*maxmin, hh"):
        create_activation("relu", 6)
    with pytest.raises(ValueError, match="'relu'"):
        LipNet("aol", "xxs", 1, 10, 8, activation="relu")


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


# -- distance pool -----------------------------------------------------------------------------
def test_reference_distance_agrees_with_boundary_sampling():
    gen = torch.Generator().manual_seed(6)
    for theta in (0.0, 1.1, 2.9, F32_PI):
        cos_a, sin_a = cone_of(pool_pair(theta)[1])
        p = torch.randn(10, 2, generator=gen, dtype=torch.float64) * 2
        ref = reference_signed_distance(p, cos_a, sin_a)
        torch.testing.assert_close(ref, sampled_signed_distance(p, cos_a, sin_a), atol=2e-5, rtol=0)


@pytest.mark.parametrize("theta", POOL_THETAS)
def test_distance_pool_is_the_signed_distance_with_unit_gradient(theta):
    gen = torch.Generator().manual_seed(7)
    for pool in pool_pair(theta):
        cos_a, sin_a = cone_of(pool)
        regions = region_points(cos_a, sin_a, 16, gen)
        expected_regions = {"edge+", "edge-"} | ({"inside"} if theta > 0 else set()) | (
            {"apex"} if theta < 3.1 else set()
        )
        assert set(regions) == expected_regions
        # 1 up to the float32 rounding of the stored pair, which scales the whole exported map
        slope = math.hypot(cos_a, sin_a)
        for name, p in regions.items():
            got = pool(as_pairs(p)).flatten()
            ref = slope * reference_signed_distance(p, cos_a, sin_a)
            torch.testing.assert_close(got, ref, atol=1e-9, rtol=0, msg=f"{name} at θ={theta}")
            assert (ref < 0).all() if name == "inside" else (ref > 0).all()
            x = as_pairs(p).clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(pool(x).sum(), x)
            norms = grad.flatten(1).norm(dim=1)
            torch.testing.assert_close(norms, torch.full_like(norms, slope), atol=1e-12, rtol=0)
            if isinstance(pool, PlainDistancePool):
                assert (norms <= pool.lipschitz_upper_bound()).all()
        p = torch.randn(64, 2, generator=gen, dtype=torch.float64) * 3  # anywhere
        ref = slope * reference_signed_distance(p, cos_a, sin_a)
        torch.testing.assert_close(pool(as_pairs(p)).flatten(), ref, atol=1e-9, rtol=0)


@pytest.mark.parametrize("theta", POOL_THETAS)
def test_distance_pool_is_1_lipschitz_across_region_boundaries(theta):
    """Close pairs around every seam, down to 1e-10 apart: no jump anywhere.

    Regression for the exported pool: its apex branch ``‖p‖`` and edge branch (slope
    ``‖(cos, sin)‖ = 1 ± 1e-8`` for the float32-stored pair) used to disagree on the seam by
    ~1e-8·‖p‖, a jump of ~4e-8 here (θ = π/2), far above the 1e-10·(1 + 1e-6) + 1e-14 allowed.
    """
    gen = torch.Generator().manual_seed(8)
    for pool in pool_pair(theta):
        cos_a, sin_a = cone_of(pool)
        for beta in boundary_angles(cos_a, sin_a):
            b = 2.0 * torch.tensor([math.cos(beta), math.sin(beta)], dtype=torch.float64)
            for eps in (1e-2, 1e-5, 1e-10):
                p = b + eps * torch.randn(100, 2, generator=gen, dtype=torch.float64)
                q = b + eps * torch.randn(100, 2, generator=gen, dtype=torch.float64)
                change = (pool(as_pairs(p)) - pool(as_pairs(q))).flatten().abs()
                # float64 rounding of the O(1) values adds ~1e-15 to any change
                excess = (change - (p - q).norm(dim=1) * (1 + 1e-6)).max().item()
                assert excess <= 1e-14, (type(pool).__name__, theta, beta, eps, excess)


def test_exported_pool_is_continuous_at_the_apex_seam():
    """Regression (see above), explicit: the two sides of the seam ⟨p, u₁⟩ = 0 agree."""
    plain = pool_pair(math.pi / 2)[1]
    cos_a, sin_a = cone_of(plain)
    assert math.hypot(cos_a, sin_a) != 1.0  # the float32-stored pair is not exactly unit
    on = 3.0 * torch.tensor([-sin_a, cos_a], dtype=torch.float64)  # ⊥ u₁ = (cos a, sin a)
    u = torch.tensor([cos_a, sin_a], dtype=torch.float64)
    eps = 1e-12
    apex_side = plain(as_pairs(on - eps * u)).item()
    edge_side = plain(as_pairs(on + eps * u)).item()
    assert abs(apex_side - edge_side) <= 4 * eps


def test_half_plane_interior_is_not_the_apex():
    """θ = π (float32 π, cos(θ/2) = −4e-8): points inside the half-plane x >= 0 are negative.

    Regression for the apex condition (``x <= 0``): without it a thin wedge around the positive
    x-axis took the apex branch ``+‖p‖``, a jump of ``2x``.
    """
    pool = DistancePool(2, theta=math.pi)  # float32, as in training
    assert float(torch.cos(pool.half_angle().detach())) < 0
    p = torch.tensor([[3.0, 0.0], [3.0, 1e-9], [3.0, -1e-9], [0.5, 1e-8]])
    for module in (pool, pool.export()):
        torch.testing.assert_close(module(as_pairs(p)).flatten(), -p[:, 0], atol=1e-6, rtol=0)


def test_distance_pool_jacobian_has_orthonormal_rows():
    """Several pairs at once, 2×2 pixels: every output has a unit gradient on its own pair."""
    gen = torch.Generator().manual_seed(9)
    pool = DistancePool(12).double()
    with torch.no_grad():
        pool.theta.copy_(torch.tensor([0.0, 0.7, math.pi / 2, 2.5, math.pi, 1.9]).view(1, 6, 1, 1))
    for module in (pool, pool.export().double()):
        for _ in range(3):
            x = torch.randn(1, 12, 2, 2, generator=gen, dtype=torch.float64)
            j = jacobian_matrix(module, x)  # (24, 48)
            eye = torch.eye(24, dtype=torch.float64)
            torch.testing.assert_close(j @ j.T, eye, atol=1e-6, rtol=0)
            assert torch.linalg.matrix_norm(j, ord=2) <= 1 + 1e-6


def test_distance_pool_export_equals_training_module():
    gen = torch.Generator().manual_seed(10)
    pool = DistancePool(12)
    with torch.no_grad():
        pool.theta.copy_(torch.tensor([0.0, 0.7, math.pi / 2, 2.5, math.pi, 3.5]).view(1, 6, 1, 1))
    plain = pool.export()
    assert isinstance(plain, PlainDistancePool)
    x = torch.randn(6, 12, 3, 3, generator=gen)
    out = plain(x)
    assert out.shape == (6, 6, 3, 3)
    torch.testing.assert_close(out, pool(x), atol=1e-6, rtol=0)
    assert 1.0 <= plain.lipschitz_upper_bound() <= 1 + 1e-6
    assert isinstance(create_pool("distance", 12), DistancePool)


@pytest.mark.parametrize("channels", [0, 1, 3, -4, 2.0])
def test_distance_pool_rejects_bad_channel_counts(channels):
    with pytest.raises(ValueError, match=re.escape(f"got {channels!r}")):
        DistancePool(channels)


@pytest.mark.parametrize("theta", [-0.1, 3.2, float("nan")])
def test_distance_pool_rejects_bad_angles(theta):
    with pytest.raises(ValueError, match=re.escape(f"got {theta!r}")):
        DistancePool(4, theta=theta)


def test_distance_pool_rejects_bad_inputs_and_names():
    with pytest.raises(ValueError, match=re.escape("(2, 6, 1, 1)")):
        DistancePool(4)(torch.zeros(2, 6, 1, 1))
    with pytest.raises(ValueError, match="'max'.*distance"):
        create_pool("max", 4)
    with pytest.raises(ValueError, match="'max'"):
        LipNet("aol", "xxs", 1, 10, 8, pool="max")
    with pytest.raises(ValueError, match="'softmax'"):
        LipNet("aol", "xxs", 1, 10, 8, head="softmax")


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
