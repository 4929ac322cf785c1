"""CRC-Lip head: proven curvature bounds, the curvature and pairwise certificates, attack checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from certify.artifact import certificate_kwargs, load_twin, to_onnx, verify
from certify.attack import attack_check
from certify.curvature import curvature_bounds, curvature_certified_accuracy, curvature_radius
from certify.radius import certified_radius
from data import load_dataset
from models.heads import CRC_BETA, CRCHead, PlainCRCHead
from models.registry import create_model
from tests.lipschitz_utils import feature_attack
from training.loss import offset_cross_entropy


def free_head(d: int = 6, hidden: int = 12, classes: int = 4, scale: float = 2.0, seed: int = 0):
    """A plain CRC head with free (unnormalized) weights: large curvature, the hard case."""
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(hidden, d, generator=gen) * scale / math.sqrt(d)
    b1 = torch.randn(hidden, generator=gen)
    w2 = torch.randn(classes, hidden, generator=gen) * scale
    b2 = torch.randn(classes, generator=gen)
    return PlainCRCHead(w1, b1, w2, b2).double()


def logit_diff(head: PlainCRCHead, y: int, j: int):
    return lambda h: (head(h[None])[0, y] - head(h[None])[0, j])


def test_curvature_bound_is_below_every_hessian_eigenvalue():
    head = free_head()
    bounds = curvature_bounds(head)
    gen = torch.Generator().manual_seed(1)
    worst = -math.inf
    for _ in range(20):
        h = torch.randn(6, generator=gen, dtype=torch.float64) * 2
        for y in range(4):
            for j in range(4):
                if y == j:
                    continue
                hess = torch.autograd.functional.hessian(logit_diff(head, y, j), h)
                lam_min = torch.linalg.eigvalsh(hess).min().item()
                m = bounds.lower_curvature[y, j].item()
                assert lam_min >= -m * (1 + 1e-9) - 1e-12
                worst = max(worst, -lam_min / m)
                grad = torch.autograd.functional.jacobian(logit_diff(head, y, j), h)
                assert grad.norm().item() <= bounds.gradient[y, j].item() * (1 + 1e-9)
    assert worst > 0.05  # the bound is not vacuous: some Hessians come near it


def first_order_radius(head, h):
    """``min_j f_j/‖∇f_j(h)‖``: ignores curvature, so it is NOT a certificate."""
    z = head(h)
    y = z.argmax(1)
    radii = []
    for n in range(len(h)):
        r = math.inf
        for j in range(z.shape[1]):
            if j == y[n]:
                continue
            hn = h[n].clone().requires_grad_(True)
            f = logit_diff(head, int(y[n]), j)(hn)
            (g,) = torch.autograd.grad(f, hn)
            r = min(r, f.item() / g.norm().item())
        radii.append(r)
    return torch.tensor(radii, dtype=torch.float64)


def test_curvature_radius_survives_the_attack_and_first_order_does_not():
    head = free_head(scale=3.0)
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(200, 6, generator=gen, dtype=torch.float64) * 2
    y = head(h).argmax(1)
    r = curvature_radius(h, head, 1.0)
    assert (r > 0).sum() > 100
    ok = r > 0
    left = feature_attack(head, h[ok], y[ok], r[ok])
    assert (left > 0).all(), left.min()
    assert left.min() < 0.2 * head(h[ok]).topk(2).values.diff(dim=1).abs().max()  # attack bites
    # The first-order radius (curvature ignored) is too large somewhere, and the attack finds it.
    r1 = first_order_radius(head, h[ok])
    assert (r1 >= r[ok] * (1 - 1e-9)).all()
    left1 = feature_attack(head, h[ok], y[ok], r1)
    assert (left1 < 0).sum() > 0


def test_curvature_radius_is_at_least_the_pairwise_one_and_scales_with_the_body_bound():
    head = free_head()
    h = torch.randn(50, 6, dtype=torch.float64)
    pairs = head.pairwise_lipschitz()
    r_pair = certified_radius(head(h), 1.0, head_distances=pairs)
    r_curv = curvature_radius(h, head, 1.0)
    assert (r_curv >= r_pair * (1 - 1e-9)).all()
    assert (r_curv > r_pair * 1.01).any()  # the local gradient helps somewhere
    torch.testing.assert_close(curvature_radius(h, head, 2.0), r_curv / 2)


def test_curvature_radius_edge_cases():
    head = free_head()
    h = torch.randn(3, 6, dtype=torch.float64)
    h[1] = float("nan")
    r = curvature_radius(h, head, 1.0)
    assert r[1] == 0 and torch.isfinite(r).all()
    with pytest.raises(ValueError, match="lipschitz_bound"):
        curvature_radius(h, head, 0.0)
    with pytest.raises(TypeError, match="not a CRC-Lip head"):
        curvature_bounds(torch.nn.Linear(3, 3))


def test_training_head_is_normalized_and_exports_its_normalized_form():
    torch.manual_seed(0)
    head = CRCHead(16, 5)
    with torch.no_grad():
        head.linear1.weight.mul_(7.0)
        head.linear2.weight.mul_(3.0)
    h = torch.randn(8, 16)
    head.eval()
    plain = head.export()
    torch.testing.assert_close(plain(h), head(h), atol=1e-5, rtol=1e-5)
    assert abs(torch.linalg.matrix_norm(plain.w1.double(), ord=2).item() - 1) < 1e-6
    torch.testing.assert_close(plain.w2.norm(dim=1), torch.ones(5))
    # Training estimates converge to the exact normalization.
    head.train()
    for _ in range(100):
        out = head(h)
    head.eval()
    torch.testing.assert_close(out, head(h), atol=1e-4, rtol=1e-4)
    # The regularizer bounds every pair's proven curvature bound.
    m = curvature_bounds(plain).lower_curvature.max().item()
    assert head.curvature_penalty().item() >= m * (1 - 1e-6)
    assert CRC_BETA == plain.beta


def train_crc_digits(steps: int = 300):
    """An AOL xxs + CRC-Lip model trained briefly with the training recipe (SGD, offset CE)."""
    torch.manual_seed(0)
    data = load_dataset("digits")
    model = create_model("aol", "xxs", 1, 10, 8, head="crc")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x_all = data.train_images.float() / 255.0
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (64,), generator=gen)
        loss = offset_cross_entropy(model(x_all[idx]), data.train_labels[idx], 0.4, 0.25)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), data


@pytest.fixture(scope="module")
def crc_model(tmp_path_factory):
    model, data = train_crc_digits()
    path = to_onnx(model, tmp_path_factory.mktemp("crc") / "crc.onnx",
                   metadata=dict(dataset="digits", classes=[str(i) for i in range(10)]))
    return model, path, data


def test_crc_export_uses_the_pairwise_certificate(crc_model):
    model, path, data = crc_model
    meta = verify(path)
    assert meta["certificate"] == "pairwise"
    assert meta["lipschitz_bound_body"] <= 1 + 1e-6
    twin = load_twin(path)
    head = twin.head.head
    expected = head.pairwise_lipschitz().numpy()
    np.testing.assert_allclose(np.asarray(meta["head_distances"]), expected, rtol=1e-12)
    kwargs = certificate_kwargs(meta)
    assert kwargs["lipschitz_bound"] == meta["lipschitz_bound_body"]


def test_crc_pairwise_and_curvature_certificates_survive_the_attack(crc_model):
    model, path, data = crc_model
    images, labels = data.test_images[:96], data.test_labels[:96]
    res = attack_check(path, images, labels, steps=25, restarts=1)
    assert res["certified"] > 5 and res["flipped"] == 0
    twin = load_twin(path)
    meta = verify(path)
    x = images.float() / 255
    with torch.no_grad():
        radii = curvature_radius(twin.body(x), twin.head.head, meta["lipschitz_bound_body"])
    res = attack_check(path, images, labels, steps=25, restarts=1, radii=radii)
    assert res["certified"] > 5 and res["flipped"] == 0
    # ... and the same check flags radii that are too large (a ball that spans the image cube).
    res = attack_check(path, images, labels, steps=25, restarts=1, radii=(radii > 0) * 8.0)
    assert res["flipped"] > 0
    acc = curvature_certified_accuracy(twin, images, labels, (0.1, 0.5),
                                       body_bound=meta["lipschitz_bound_body"])
    assert set(acc) == {"0.1000", "0.5000"} and acc["0.1000"] >= acc["0.5000"]
    with pytest.raises(ValueError, match="radii must have shape"):
        attack_check(path, images, labels, radii=radii[:3])


def test_certify_cli_reports_and_attacks_the_curvature_certificate(crc_model, tmp_path, capsys):
    from certify.__main__ import main as certify_main

    model, path, data = crc_model
    local = tmp_path / "crc.onnx"
    local.write_bytes(Path(path).read_bytes())
    code = certify_main([
        "evaluate", str(local), "--dataset", "digits", "--limit", "120", "--curvature",
        "--attack-points", "16", "--attack-steps", "10",
    ])
    out = capsys.readouterr().out
    assert code == 0 and "curvature certificate" in out
    report = json.loads(local.with_suffix(".certify.json").read_text())
    twin = load_twin(local)
    expected = curvature_certified_accuracy(
        twin, data.test_images[:120], data.test_labels[:120], (36 / 255,),
        body_bound=verify(local)["lipschitz_bound_body"],
    )
    assert report["curvature"]["accuracy"]["0.1412"] == expected["0.1412"]
    assert report["curvature"]["attack"]["flipped"] == 0
    assert report["curvature"]["attack"]["attacked"] > 0
    # The curvature certificate sits above the pairwise one at every radius.
    for key, value in report["curvature"]["accuracy"].items():
        assert value >= report["accuracy"][key] - 1e-12


def test_certify_cli_refuses_curvature_without_a_crc_head(tmp_path, capsys):
    from certify.__main__ import main as certify_main

    torch.manual_seed(0)
    model = create_model("aol", size="xxs", in_channels=1, num_classes=10, image_size=8).eval()
    path = to_onnx(model, tmp_path / "aol.onnx",
                   metadata=dict(dataset="digits", classes=[str(i) for i in range(10)]))
    code = certify_main(["evaluate", str(path), "--dataset", "digits", "--limit", "20",
                         "--curvature", "--attack-points", "2", "--attack-steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--curvature needs a model with a CRC-Lip head" in err
