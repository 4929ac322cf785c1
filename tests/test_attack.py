"""Attack check: no flips on a sound model, flips on a model whose weights outgrew its bound."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from certify.artifact import to_onnx
from certify.attack import attack_check
from data import load_dataset
from models.registry import create_model


def train_digits_model(steps: int = 100) -> tuple[torch.nn.Module, object]:
    """A briefly trained AOL xxs model on sklearn digits (a few seconds on one core)."""
    torch.manual_seed(0)
    data = load_dataset("digits")
    model = create_model("aol", "xxs", 1, 10, 8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x_all = data.train_images.float() / 255.0
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (64,), generator=gen)
        loss = F.cross_entropy(model(x_all[idx]) * 8.0, data.train_labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, data


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model, data = train_digits_model()
    path = to_onnx(model, tmp_path_factory.mktemp("attack") / "aol.onnx",
                   metadata=dict(dataset="digits", classes=[str(i) for i in range(10)]))
    return path, data


def test_no_flips_on_sound_model(trained):
    path, data = trained
    res = attack_check(path, data.test_images[:64], data.test_labels[:64], steps=30, restarts=1)
    assert res["certified"] > 5
    assert res["attacked"] == res["certified"]
    assert res["flipped"] == 0
    assert 0.9 < res["max_relative_norm"] <= 0.999 + 1e-5
    assert res["min_margin_left"] > 0


def test_flips_when_weights_outgrow_the_bound(trained, tmp_path):
    path, data = trained
    proto = onnx.load(str(path))
    head = [t for t in proto.graph.initializer
            if t.name.startswith("head") and t.name.endswith("weight")]
    assert head, [t.name for t in proto.graph.initializer]
    for t in head:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 3.0, t.name))
    # Keep the old metadata: the stored bound and head distances now understate the network.
    broken = tmp_path / "broken.onnx"
    onnx.save_model(proto, str(broken))
    res = attack_check(broken, data.test_images[:64], data.test_labels[:64], steps=30, restarts=1,
                       verify_hash=False)
    assert res["certified"] > 5
    assert res["flipped"] > 0


def test_tampered_file_refused_by_default(trained, tmp_path):
    from certify.artifact import ModelVerificationError

    path, data = trained
    proto = onnx.load(str(path))
    t = proto.graph.initializer[0]
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.01, t.name))
    bad = tmp_path / "bad.onnx"
    onnx.save_model(proto, str(bad))
    with pytest.raises(ModelVerificationError, match="weights_sha256"):
        attack_check(bad, data.test_images[:4])


def test_bad_arguments(trained):
    path, data = trained
    with pytest.raises(ValueError, match="steps"):
        attack_check(path, data.test_images[:4], steps=0)
