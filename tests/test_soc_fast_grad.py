"""Fast SOC gradients (models/soc_fast.py): exact mode equals autograd, paper mode is close."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models.export import to_plain
from models.layers.soc import SOCConv2d, skew_kernel
from models.registry import create_model
from models.soc_fast import conv_exponential, is_skew_kernel, resolve_grad_mode


def horner(x, kernel, terms):
    z = x
    for i in range(terms, 0, -1):
        z = x + F.conv2d(z, kernel, padding=kernel.shape[-1] // 2) / i
    return z


def grads(fn, x, kernel, g):
    x = x.clone().requires_grad_(True)
    kernel = kernel.clone().requires_grad_(True)
    y = fn(x, kernel)
    return (y, *torch.autograd.grad((y * g).sum(), (x, kernel)))


def scaled_skew(c, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(c, c, k, k, generator=gen, dtype=dtype)
    s = skew_kernel(w)
    return 0.7 * s / s.flatten().norm()


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("terms", [1, 2, 6])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_exact_mode_equals_autograd(k, terms, dtype, tol):
    kernel = scaled_skew(4, k, dtype)
    assert is_skew_kernel(kernel)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 5, 7, generator=gen, dtype=dtype)  # non-square maps
    g = torch.randn(2, 4, 5, 7, generator=gen, dtype=dtype)
    y0, gx0, gk0 = grads(lambda a, b: horner(a, b, terms), x, kernel, g)
    y1, gx1, gk1 = grads(lambda a, b: conv_exponential(a, b, terms, "exact"), x, kernel, g)
    scale = max(gk0.abs().max().item(), 1.0)
    assert (y1 - y0).abs().max() <= tol
    assert (gx1 - gx0).abs().max() <= tol
    assert (gk1 - gk0).abs().max() <= tol * scale


def test_non_skew_kernel_falls_back_and_stays_exact():
    gen = torch.Generator().manual_seed(2)
    kernel = 0.2 * torch.randn(3, 3, 3, 3, generator=gen, dtype=torch.float64)
    assert not is_skew_kernel(kernel)
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    ref = grads(lambda a, b: horner(a, b, 4), x, kernel, g)
    got = grads(lambda a, b: conv_exponential(a, b, 4, "exact"), x, kernel, g)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_paper_mode_input_gradient_exact_kernel_gradient_approximate():
    kernel = scaled_skew(4, 3, torch.float64, seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64)
    y0, gx0, gk0 = grads(lambda a, b: horner(a, b, 6), x, kernel, g)
    y1, gx1, gk1 = grads(lambda a, b: conv_exponential(a, b, 6, "paper"), x, kernel, g)
    torch.testing.assert_close(y1, y0, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gx1, gx0, atol=1e-12, rtol=1e-12)
    rel = ((gk1 - gk0).norm() / gk0.norm()).item()
    assert 1e-6 < rel < 0.2  # approximate (1/((a+1)!(b+1)!) for 1/(a+b+1)!), not wrong
    assert F.cosine_similarity(gk1.flatten(), gk0.flatten(), dim=0) > 0.98


def test_layer_option_gives_the_same_training_gradients_to_the_weights():
    torch.manual_seed(0)
    plain = SOCConv2d(6, 3).double()
    fast = copy.deepcopy(plain)
    fast.grad_mode, fast.fast_grad = resolve_grad_mode(True), True
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    for layer in (plain, fast):
        layer.train()
        layer(x).square().sum().backward()
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fast.bias.grad, plain.bias.grad, atol=1e-10, rtol=1e-10)
    assert "fast_grad=exact" in repr(fast)


def test_lipnet_with_fast_grad_trains_and_exports_like_without():
    torch.manual_seed(0)
    ref = create_model("soc", "xxs", 1, 10, 8)
    torch.manual_seed(0)
    fast = create_model("soc", "xxs", 1, 10, 8, layer_options={"fast_grad": "exact"})
    fast.load_state_dict(ref.state_dict())
    x = torch.rand(4, 1, 8, 8)
    for model in (ref, fast):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        model(x).sum().backward()
        opt.step()
    for (name, a), b in zip(fast.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    out_fast, out_ref = to_plain(fast)(x), to_plain(ref)(x)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("value", ["fast", 1, "Exact"])
def test_bad_fast_grad_values(value):
    with pytest.raises(ValueError, match="fast_grad must be False, True or one of exact, paper"):
        SOCConv2d(4, 3, fast_grad=value)


def test_bench_runs_on_tiny_settings(tmp_path, capsys):
    import json

    from bench.soc_fast import main

    assert main(["--sizes", "", "--batch", "2", "--repeats", "1", "--warmup", "0",
                 "--layer-channels", "4", "--layer-pixels", "4", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "soc_fast.json").read_text())
    (row,) = result["rows"]
    for key in ("autograd_ms", "exact_ms", "paper_ms", "exact_ratio", "paper_ratio",
                "exact_max_grad_rel_diff", "paper_max_grad_rel_diff"):
        assert row[key] >= 0, key
    assert row["exact_max_grad_rel_diff"] < 1e-4 and row["autograd_ratio"] == 1.0
    assert "exact ÷ autograd" in capsys.readouterr().out
    assert main(["--sizes", "xxl"]) == 2
