"""The layer contract, checked for every registered method (parametrized over the registry)."""

from __future__ import annotations

import copy

import pytest
import torch

from models import create_layer, layer_class, list_methods
from tests.lipschitz_utils import adversarial_steps, singular_values

METHODS = list_methods()
LIPSCHITZ = [m for m in METHODS if layer_class(m).lipschitz]
ORTHOGONAL = [m for m in METHODS if layer_class(m).orthogonal]
# The comparison paper's best CIFAR-10 learning rates at size XS (standard: a typical value).
PAPER_LR = {
    "aol": 6e-2, "bcop": 7e-3, "cpl": 3e-2, "cayley": 2e-2, "lot": 8e-2, "sll": 9e-2,
    "soc": 5e-2, "standard": 1e-2,
}
C, N = 4, 8


def test_registry_names():
    assert set(METHODS) >= {"aol", "standard"}
    assert all(m == m.lower() for m in METHODS)
    with pytest.raises(ValueError, match="unknown method 'aoll'; choose from"):
        create_layer("aoll", 4)


@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("method", LIPSCHITZ)
def test_exact_norm_at_init_and_after_adversarial_training(method, kernel_size):
    layer = create_layer(method, C, kernel_size)
    x = torch.randn(1, C, N, N)
    layer.eval()
    assert singular_values(copy.deepcopy(layer), x).max() <= 1 + 1e-4
    adversarial_steps(layer, (C, N, N), steps=20)
    layer.eval()
    for _ in range(3):
        sv = singular_values(copy.deepcopy(layer), torch.randn(1, C, N, N))
        assert sv.max() <= 1 + 1e-4, f"{method} k={kernel_size}: norm {sv.max():.6f}"


@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("method", ORTHOGONAL)
def test_orthogonal_methods_keep_all_singular_values_near_one(method, kernel_size):
    layer = create_layer(method, C, kernel_size)
    adversarial_steps(layer, (C, N, N), steps=20)
    layer.eval()
    sv = singular_values(copy.deepcopy(layer), torch.randn(1, C, N, N))
    assert sv.min() >= 0.99, f"{method}: smallest singular value {sv.min():.4f}"


@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("method", METHODS)
def test_export_equals_eval_forward(method, kernel_size):
    layer = create_layer(method, 6, kernel_size)
    adversarial_steps(layer, (6, N, N), steps=3)  # move away from the (often special) init
    layer.eval()
    x = torch.randn(3, 6, N, N)
    with torch.no_grad():
        torch.testing.assert_close(layer.export()(x), layer(x), atol=1e-5, rtol=0)
        assert not any(p.requires_grad for p in layer.export().parameters())


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_has_no_stale_cache(method):
    a, b = create_layer(method, C, 3), create_layer(method, C, 3)
    x = torch.randn(2, C, N, N)
    b.eval()
    with torch.no_grad():
        b(x)  # fill b's eval cache with its own (soon stale) weights
    adversarial_steps(a, (C, N, N), steps=3)
    a.eval()
    b.load_state_dict(a.state_dict())
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_every_parameter_and_sgd_stays_finite(method):
    layer = create_layer(method, C, 3)
    opt = torch.optim.SGD(layer.parameters(), lr=PAPER_LR.get(method, 1e-2), momentum=0.9)
    for step in range(5):
        x = torch.randn(8, C, N, N)
        loss = layer(x).square().mean() - layer(x).abs().mean()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, p in layer.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"
        opt.step()
    assert all(torch.isfinite(p).all() for p in layer.parameters())
    assert torch.isfinite(layer(torch.randn(2, C, N, N))).all()


@pytest.mark.parametrize("method", METHODS)
def test_layer_works_on_any_spatial_size(method):
    layer = create_layer(method, C, 3).eval()
    for n in (5, 8, 12):
        with torch.no_grad():
            assert layer(torch.randn(1, C, n, n)).shape == (1, C, n, n)
