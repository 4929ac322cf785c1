"""Issue #7 (Singla & Feizi's improvements): HH activation, distance pool, LLN head.

Exact checks in float64 on tiny inputs: the HH Jacobian is orthogonal and the distance pool is the
signed distance to its cone (against an independent reference) with unit-norm gradients and no
jump at any region boundary, in the training and the exported form. Then whole LipNets with the
options: audit rows, ONNX export and parity, the LLN linear-head certificate, and the attack check
finding no flips under it while catching the generic certificate on an antipodal LLN head.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from certify.attack import attack_check
from certify.audit import audit
from certify.radius import certified_radius, head_row_distances
from models.activations import HouseholderActivation, PlainHouseholder, create_activation
from models.blocks import MaxMin
from certify.artifact import certificate_kwargs, load_onnx, load_twin, to_onnx, verify
from models.export import to_plain
from models.heads import PlainLLNHead
from models.network import LipNet
from models.pooling import DistancePool, PlainDistancePool, create_pool
from models.registry import create_model
from tests.lipschitz_utils import jacobian_matrix
from training.data import load_dataset

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


# -- whole networks ----------------------------------------------------------------------------
COMBOS = [
    ("aol", "hh", "distance", "lln", 8),
    ("soc", "hh", "distance", "lln", 8),
    ("soc", "maxmin", None, "lln", 8),
    ("aol", "hh", "distance", "linear", 16),
]


@pytest.mark.parametrize("method,activation,pool,head,size", COMBOS)
def test_network_options_train_export_and_audit_rows(method, activation, pool, head, size):
    torch.manual_seed(0)
    model = create_model(method, "xxs", 1, 10, size, activation=activation, pool=pool, head=head)
    x = torch.rand(3, 1, size, size)
    model.train()
    logits = model(x)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    logits.logsumexp(dim=1).sum().backward()
    new = [m for m in model.modules() if isinstance(m, (HouseholderActivation, DistancePool))]
    assert len(new) == (10 + 3 * (size == 16)) * (activation == "hh") + (pool is not None)
    for m in new:  # the new parameters learn
        assert m.theta.grad is not None and torch.isfinite(m.theta.grad).all()
    # Every angle gets a gradient, except behind AOL's Dirac init: identity convs hand each HH
    # pairs that the previous one already sorted, which sit on its identity branch (θ-free).
    moving = [m.theta.grad.abs().max() > 0 for m in new]
    assert all(moving) if method == "soc" else any(moving) or not new

    model.eval()
    plain = to_plain(model)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=0)
    result = audit(plain, (1, size, size), lower=False)
    rows = {r.name: r for r in result.rows}
    hh_rows = [r for r in result.rows if r.type == "PlainHouseholder"]
    assert len(hh_rows) == (10 + 3 * (size == 16) if activation == "hh" else 0)
    assert all(1.0 <= r.bound <= 1 + 1e-6 and r.part == "body" for r in hh_rows)
    last = f"body.block{int(math.log2(size)) - 1}.first"
    if pool:
        assert rows[last].type == "PlainDistancePool" and 1.0 <= rows[last].bound <= 1 + 1e-6
        assert rows[last].input_shape == (4 * size, 2, 2)
    else:
        assert rows[last].type == "FirstChannels"
    assert result.body_bound <= 1 + 1e-6
    assert result.certificate == "linear_head"
    if head == "lln":
        (head_row,) = [r for r in result.rows if r.part == "head"]
        assert head_row.type == "PlainLLNHead"
        w = model.head.head.normalized_weight().detach().double()
        assert head_row.bound == pytest.approx(float(torch.linalg.matrix_norm(w, ord=2)), rel=1e-6)
        assert head_row.bound >= 1.0
        np.testing.assert_allclose(result.head_rows, w.numpy(), atol=1e-6)
        np.testing.assert_allclose(result.head_pairs, torch.cdist(w, w).numpy(), atol=1e-6)
        assert result.bound == pytest.approx(result.body_bound * head_row.bound, rel=1e-12)


def train_lln_model(data, steps: int = 80) -> LipNet:
    """An AOL xxs digits model with all three options, briefly trained (seconds on one core)."""
    torch.manual_seed(0)
    model = create_model("aol", "xxs", 1, 10, 8, head="lln", activation="hh", pool="distance")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x_all = data.train_images.float() / 255.0
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x_all[idx]) * 8.0, data.train_labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained_lln(digits, tmp_path_factory):
    model = train_lln_model(digits)
    path = to_onnx(model, tmp_path_factory.mktemp("lln") / "lln.onnx",
                   metadata=dict(dataset="digits", classes=digits.classes))
    return model, path


def test_trained_options_model_exports_verifies_and_matches(trained_lln, digits):
    model, path = trained_lln
    acts = [m for m in model.modules() if isinstance(m, HouseholderActivation)]
    pool = [m for m in model.modules() if isinstance(m, DistancePool)]
    # Trained away from the initialization, so the export is not only tested at MaxMin.
    assert max((m.theta - math.pi / 2).abs().max().item() for m in acts + pool) > 1e-3
    meta = verify(path)
    session, _ = load_onnx(path, threads=1)
    x = digits.test_images[:32].float() / 255.0
    (out,) = session.run(["logits"], {"image": x.numpy()})
    with torch.no_grad():
        assert np.abs(out - model(x).numpy()).max() <= 1e-4
        assert np.abs(load_twin(path)(x).numpy() - out).max() <= 1e-4
    assert meta["certificate"] == "linear_head"
    w = model.head.head.normalized_weight().detach().double()
    distances = np.asarray(meta["head_distances"])
    np.testing.assert_allclose(distances, torch.cdist(w, w).numpy(), atol=1e-6)
    assert meta["lipschitz_bound_body"] <= 1 + 1e-6
    head_norm = float(torch.linalg.matrix_norm(w, ord=2))
    assert meta["lipschitz_bound_head"] == pytest.approx(head_norm, rel=1e-6)
    assert meta["lipschitz_bound"] == pytest.approx(
        meta["lipschitz_bound_body"] * meta["lipschitz_bound_head"], rel=1e-12
    )
    kwargs = certificate_kwargs(meta)
    assert kwargs["lipschitz_bound"] == meta["lipschitz_bound_body"]
    assert kwargs["head_distances"].shape == (10, 10)


def test_trained_lln_model_has_no_flips_under_its_certificate(trained_lln, digits):
    _, path = trained_lln
    res = attack_check(path, digits.test_images[:96], digits.test_labels[:96], steps=25, restarts=1)
    assert res["certified"] >= 5
    assert res["flipped"] == 0
    assert 0.9 < res["max_relative_norm"] <= 0.999 + 1e-5


# -- a provably wrong certificate is caught ----------------------------------------------------
THRESHOLD = 0.7  # class 0 iff the chosen pixel is brighter than this


def antipodal_lln_model(images: torch.Tensor) -> tuple[LipNet, int]:
    """A 2-class LipNet whose body passes ``relu(x − 1/2)`` through and whose LLN rows are ``±e``.

    AOL's Dirac initialization makes every 3×3 conv the identity (up to AOL's ``1/√(1 + 1e-6)``);
    the 1×1 stem is set to the identity too. HH at its initial π/2 is MaxMin, and each MaxMin
    pairs a carried channel with a zero one, so the body is a permutation of ``relu(x − 1/2)``:
    gain 1 on every pixel above 1/2. The head rows are ``e_k`` and ``−e_k`` for the feature ``k``
    of the brightest pixel: ``z_0 − z_1 = 2·h_k − 2·(THRESHOLD − 1/2)``, which moves at rate 2
    along that pixel. The true radius is ``margin/2`` (the linear-head one, exactly), the
    generic ``margin/√2`` of a 1-Lipschitz network is √2 too large.

    Returns:
        The model and the pixel's flat index.
    """
    torch.manual_seed(0)
    model = create_model("aol", "xxs", 1, 2, 8, head="lln", activation="hh")
    with torch.no_grad():
        stem = model.body.stem.weight
        stem.zero_()
        stem[:, :, 0, 0] = torch.eye(stem.shape[0])
    x = images.float() / 255.0
    pixel = int((x.flatten(1) > 0.8).sum(dim=0).argmax())
    probe = torch.full((1, 1, 8, 8), 0.5)
    probe.view(-1)[pixel] = 1.0
    with torch.no_grad():
        k = int(model.eval().body(probe).flatten().argmax())
        head = model.head.head
        head.weight.zero_()
        head.weight[0, k], head.weight[1, k] = 1.0, -1.0
        head.bias.copy_(torch.tensor([-2 * (THRESHOLD - 0.5), 0.0]))
    return model, pixel


@pytest.fixture(scope="module")
def antipodal(digits, tmp_path_factory):
    images = digits.test_images[:120]
    model, pixel = antipodal_lln_model(images)
    path = to_onnx(model, tmp_path_factory.mktemp("antipodal") / "antipodal.onnx")
    return model, pixel, path, images


def test_antipodal_construction_is_what_it_claims(antipodal):
    model, pixel, path, images = antipodal
    x = images.float() / 255.0
    with torch.no_grad():
        h = model.body(x).flatten(1)
    relu = (x - 0.5).clamp_min(0).flatten(1)
    torch.testing.assert_close(h.sort(dim=1).values, relu.sort(dim=1).values, atol=1e-5, rtol=0)
    meta = verify(path)
    assert meta["certificate"] == "linear_head"
    np.testing.assert_allclose(np.asarray(meta["head_distances"]), [[0, 2], [2, 0]], atol=1e-9)
    assert meta["lipschitz_bound_body"] <= 1 + 1e-6
    assert meta["lipschitz_bound"] > 1.4  # √2: not 1-Lipschitz as a whole, and that is fine
    assert ((x.flatten(1)[:, pixel] > THRESHOLD + 0.02).sum()) >= 10  # class-0 points to attack


def test_attack_check_accepts_linear_head_and_catches_generic_certificate(antipodal):
    model, pixel, path, images = antipodal
    session, meta = load_onnx(path, threads=1)
    (logits,) = session.run(["logits"], {"image": images.float().numpy() / 255.0})
    right = certified_radius(logits, **certificate_kwargs(meta))
    wrong = certified_radius(logits, 1.0)  # generic margin/√2: pretends the network is 1-Lipschitz
    sure = (logits.argmax(1) == 0) & (right > 0.01)
    assert sure.sum() >= 10
    ratio = math.sqrt(2) * meta["lipschitz_bound_body"]
    np.testing.assert_allclose(wrong[sure] / right[sure], ratio, rtol=1e-3)

    sound = attack_check(path, images, steps=30, restarts=1)
    assert sound["certified"] >= 20 and sound["flipped"] == 0
    # The attack is strong here: the linear-head radius is tight, PGD ends on the boundary.
    assert 0 <= sound["min_margin_left"] < 0.01

    caught = attack_check(path, images, steps=30, restarts=1, radii=wrong)
    assert caught["flipped"] >= sure.sum()  # every confidently class-0 point flips
    # The whole-network bound (√2) with the generic certificate is sound again.
    whole = attack_check(path, images, steps=30, restarts=1,
                         radii=certified_radius(logits, meta["lipschitz_bound"]))
    assert whole["flipped"] == 0
    head = load_twin(path).head.head
    assert isinstance(head, PlainLLNHead)
    expected = torch.tensor([[0.0, 2.0], [2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(head_row_distances(head.rows), expected, atol=1e-9, rtol=0)
