"""LipNets with Singla & Feizi's options (HH activation, distance pool, LLN head).

Whole networks: audit rows, ONNX export and parity, the LLN linear-head certificate, and the
attack check finding no flips under it while catching the generic certificate on an antipodal
LLN head.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from certify.artifact import certificate_kwargs, load_onnx, load_twin, to_onnx, verify
from certify.attack import attack_check
from certify.audit import audit
from certify.radius import certified_radius, head_row_distances
from data import load_dataset
from models.activations import HouseholderActivation
from models.export import to_plain
from models.heads import PlainLLNHead
from models.layers.soc import TRUNCATION_TOL
from models.network import LipNet
from models.pooling import DistancePool
from models.registry import create_model
from tests.lipschitz_utils import feature_attack

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
    # SOC exports the fewest Taylor terms with truncation error <= TRUNCATION_TOL, and the audit
    # bounds that truncated polynomial: each of its rows may exceed 1 by up to that much.
    soc_rows = [r for r in result.rows if r.type == "ConvExponential"]
    assert all(r.bound <= 1 + TRUNCATION_TOL for r in soc_rows)
    assert result.body_bound <= math.prod(r.bound for r in soc_rows) * (1 + 1e-6)
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
