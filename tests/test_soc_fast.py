"""Fast SOC gradients (models/soc_fast.py, SOCConv2d(fast_grad=...), bench/soc_fast.py).

"exact" must equal autograd through the Horner loop; "paper" must be the paper's rank-one
formula (input gradient exact, kernel gradient approximate but aligned).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from models.exp_series import exp_coefficients, horner_ratios
from models.export import to_plain
from models.layers.soc import SOCConv2d, skew_kernel
from models.registry import create_model
from models.soc_fast import conv_exponential, is_skew_kernel, resolve_grad_mode


def horner(x: torch.Tensor, kernel: torch.Tensor, terms: int) -> torch.Tensor:
    z = x
    for i in range(terms, 0, -1):
        z = x + F.conv2d(z, kernel, padding=kernel.shape[-1] // 2) / i
    return z


def grads(fn, x, kernel, g):
    """``(y, ∂⟨g, y⟩/∂x, ∂⟨g, y⟩/∂kernel)`` of ``y = fn(x, kernel)``."""
    x = x.clone().requires_grad_(True)
    kernel = kernel.clone().requires_grad_(True)
    y = fn(x, kernel)
    return (y.detach(), *torch.autograd.grad((y * g).sum(), (x, kernel)))


def scaled_skew(
    c: int, k: int, dtype: torch.dtype, seed: int = 0, norm: float = 0.7
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    s = skew_kernel(torch.randn(c, c, k, k, generator=gen, dtype=dtype))
    return norm * s / s.flatten().norm()  # ‖conv‖ ≤ √(k²)·‖·‖_F-ish: a realistic SOC scale


def data(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype), torch.randn(
        *shape, generator=gen, dtype=dtype
    )


def wgrad(a: torch.Tensor, b: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Weight gradient of ⟨b, conv2d(a, K)⟩ (independent of K's value)."""
    k = kernel.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((F.conv2d(a, k, padding=k.shape[-1] // 2) * b).sum(), k)
    return grad


def power(v: torch.Tensor, kernel: torch.Tensor, n: int, transpose: bool = False) -> torch.Tensor:
    p = kernel.shape[-1] // 2
    for _ in range(n):
        v = (
            F.conv_transpose2d(v, kernel, padding=p)
            if transpose
            else F.conv2d(v, kernel, padding=p)
        )
    return v


# -- the Function ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("terms", [1, 2, 6])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_exact_mode_equals_autograd(k, terms, dtype, tol):
    kernel = scaled_skew(4, k, dtype, norm=0.9)
    x, g = data((2, 4, 5, 7), dtype, seed=1)  # non-square maps
    y0, gx0, gk0 = grads(lambda a, b: horner(a, b, terms), x, kernel, g)
    y1, gx1, gk1 = grads(lambda a, b: conv_exponential(a, b, terms, "exact"), x, kernel, g)
    assert (y1 - y0).abs().max() <= tol * y0.abs().max()
    assert (gx1 - gx0).abs().max() <= tol * gx0.abs().max()
    assert (gk1 - gk0).abs().max() <= tol * gk0.abs().max()


def ratio_horner(x: torch.Tensor, kernel: torch.Tensor, ratios) -> torch.Tensor:
    z = x
    for i in range(len(ratios) - 1, 0, -1):
        z = x + ratios[i] * F.conv2d(z, kernel, padding=kernel.shape[-1] // 2)
    return ratios[0] * z


@pytest.mark.parametrize("terms", [1, 3, 5])
def test_both_modes_take_any_polynomial_in_ratio_form(terms):
    """Chebyshev ratios (c₀ ≠ 1): "exact" is autograd, "paper" keeps the input gradient exact."""
    ratios = horner_ratios(exp_coefficients("chebyshev", terms, 0.7))
    assert ratios[0] != 1
    kernel = scaled_skew(4, 3, torch.float64, seed=11)
    x, g = data((2, 4, 5, 6), torch.float64, seed=12)
    y0, gx0, gk0 = grads(lambda a, b: ratio_horner(a, b, ratios), x, kernel, g)
    y1, gx1, gk1 = grads(lambda a, b: conv_exponential(a, b, ratios, "exact"), x, kernel, g)
    for got, ref in ((y1, y0), (gx1, gx0), (gk1, gk0)):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)
    y2, gx2, gk2 = grads(lambda a, b: conv_exponential(a, b, ratios, "paper"), x, kernel, g)
    torch.testing.assert_close(y2, y0, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gx2, gx0, atol=1e-12, rtol=1e-10)
    assert F.cosine_similarity(gk2.flatten(), gk0.flatten(), dim=0) > 0.999
    # The integer form is the Taylor polynomial's ratio form.
    taylor = horner_ratios(exp_coefficients("taylor", terms, 0.7))
    torch.testing.assert_close(
        conv_exponential(x, kernel, taylor, "exact"), conv_exponential(x, kernel, terms, "exact")
    )


def test_exact_mode_is_the_truncated_series_gradient_formula():
    """∂⟨g, p(L)x⟩/∂L = Σ_{a+b<T} wgrad(Lᵃx, (Lᵀ)ᵇg)/(a+b+1)! (module docstring)."""
    terms, kernel = 4, scaled_skew(3, 3, torch.float64, seed=2)
    x, g = data((2, 3, 6, 5), torch.float64, seed=3)
    expected = sum(
        wgrad(power(x, kernel, a), power(g, kernel, b, transpose=True), kernel)
        / math.factorial(a + b + 1)
        for a in range(terms)
        for b in range(terms - a)
    )
    _, _, gk = grads(lambda a, b: conv_exponential(a, b, terms, "exact"), x, kernel, g)
    torch.testing.assert_close(gk, expected, atol=1e-12, rtol=1e-10)


def test_paper_mode_is_the_rank_one_formula_and_close_to_exact():
    terms, kernel = 6, scaled_skew(4, 3, torch.float64, seed=4)
    x, g = data((2, 4, 6, 6), torch.float64, seed=5)
    y0, gx0, gk0 = grads(lambda a, b: horner(a, b, terms), x, kernel, g)
    y1, gx1, gk1 = grads(lambda a, b: conv_exponential(a, b, terms, "paper"), x, kernel, g)
    torch.testing.assert_close(y1, y0, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gx1, gx0, atol=1e-12, rtol=1e-12)  # input gradient: exact
    # The kernel gradient is wgrad(φ(L)x, φ(Lᵀ)g), φ(t) = Σ_{k<T} tᵏ/(k+1)!, i.e. the double sum
    # with 1/((a+1)!(b+1)!) for all a, b < T.
    phi = lambda v, tr: sum(power(v, kernel, j, tr) / math.factorial(j + 1) for j in range(terms))  # noqa: E731
    torch.testing.assert_close(
        gk1, wgrad(phi(x, False), phi(g, True), kernel), atol=1e-12, rtol=1e-10
    )
    rel = ((gk1 - gk0).norm() / gk0.norm()).item()
    assert 1e-5 < rel < 0.05  # measured 7.5e-3 here: approximate, not exact, not wrong
    assert F.cosine_similarity(gk1.flatten(), gk0.flatten(), dim=0) > 0.999


def test_paper_mode_equals_exact_for_one_term():
    kernel = scaled_skew(3, 3, torch.float64, seed=6)
    x, g = data((1, 3, 5, 5), torch.float64, seed=7)
    ref = grads(lambda a, b: horner(a, b, 1), x, kernel, g)
    got = grads(lambda a, b: conv_exponential(a, b, 1, "paper"), x, kernel, g)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", ["exact", "paper"])
def test_non_skew_kernel_input_gradient_stays_exact(mode):
    gen = torch.Generator().manual_seed(8)
    kernel = 0.2 * torch.randn(3, 3, 3, 3, generator=gen, dtype=torch.float64)
    assert not is_skew_kernel(kernel)
    x, g = data((2, 3, 6, 4), torch.float64, seed=9)
    ref = grads(lambda a, b: horner(a, b, 4), x, kernel, g)
    got = grads(lambda a, b: conv_exponential(a, b, 4, mode), x, kernel, g)
    torch.testing.assert_close(got[0], ref[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got[1], ref[1], atol=1e-12, rtol=1e-12)
    if mode == "exact":
        torch.testing.assert_close(got[2], ref[2], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", ["exact", "paper"])
def test_kernel_gradient_without_input_gradient(mode):
    """The first layer's input needs no gradient: the kernel gradient must not change."""
    kernel = scaled_skew(3, 3, torch.float64, seed=10)
    x, g = data((2, 3, 5, 5), torch.float64, seed=11)
    _, _, full = grads(lambda a, b: conv_exponential(a, b, 5, mode), x, kernel, g)
    k = kernel.clone().requires_grad_(True)
    (only,) = torch.autograd.grad((conv_exponential(x, k, 5, mode) * g).sum(), k)
    torch.testing.assert_close(only, full, atol=1e-14, rtol=1e-12)


def test_zero_terms_is_identity():
    kernel = scaled_skew(2, 3, torch.float64)
    x, g = data((1, 2, 4, 4), torch.float64, seed=12)
    for mode in ("exact", "paper"):
        y, gx, gk = grads(lambda a, b, m=mode: conv_exponential(a, b, 0, m), x, kernel, g)
        assert torch.equal(y, x) and torch.equal(gx, g) and not gk.any()


def test_double_backward_is_refused():
    kernel = scaled_skew(2, 3, torch.float64).requires_grad_(True)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    (gk,) = torch.autograd.grad(
        conv_exponential(x, kernel, 3).square().sum(), kernel, create_graph=True
    )
    with pytest.raises(
        RuntimeError, match="(?i)double backward|once_differentiable|differentiable"
    ):
        gk.sum().backward()


def test_autocast_bf16_runs_and_sends_float32_gradients_to_the_kernel():
    kernel = scaled_skew(4, 3, torch.float32, seed=13).requires_grad_(True)
    x, g = data((2, 4, 6, 6), torch.float32, seed=14)
    ref = grads(lambda a, b: horner(a, b, 4), x, kernel.detach(), g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv_exponential(x, kernel, 4, "exact")
    assert y.dtype == torch.bfloat16
    (gk,) = torch.autograd.grad((y.float() * g).sum(), kernel)
    assert gk.dtype == torch.float32
    assert ((gk - ref[2]).norm() / ref[2].norm()).item() < 0.05  # bf16 rounding only


def test_function_argument_errors():
    kernel = scaled_skew(2, 3, torch.float32)
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="unknown grad_mode 'fast'; choose from exact, paper"):
        conv_exponential(x, kernel, 2, "fast")
    with pytest.raises(ValueError, match="terms must be a non-negative int"):
        conv_exponential(x, kernel, -1)
    with pytest.raises(ValueError, match="kernel must be"):
        conv_exponential(x, torch.zeros(2, 2, 2, 2), 2)


# -- the layer option ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, mode",
    [(False, None), (None, None), (True, "exact"), ("exact", "exact"), ("paper", "paper")],
)
def test_resolve_grad_mode(value, mode):
    assert resolve_grad_mode(value) == mode


@pytest.mark.parametrize("value", ["fast", 1, 0, "Exact", "autograd"])
def test_bad_fast_grad_values_raise_naming_the_value_and_choices(value):
    with pytest.raises(
        ValueError, match=rf"fast_grad must be False, True or one of exact, paper; got {value!r}"
    ):
        SOCConv2d(4, 3, fast_grad=value)
    layer = SOCConv2d(4, 3, fast_grad="paper")
    with pytest.raises(ValueError, match="fast_grad must be"):
        layer.fast_grad = value
    assert layer.fast_grad == "paper" and layer.grad_mode == "paper"  # unchanged by the failed set


def test_train_kernel_is_exactly_skew():
    """The layer's scaled kernel is skew to the bit (sign-symmetric float operations)."""
    torch.manual_seed(0)
    layer = SOCConv2d(6, 3).train()
    assert is_skew_kernel(layer.train_kernel()) and is_skew_kernel(layer.eval_kernel())


@pytest.mark.parametrize("fast_grad, tol", [(True, 1e-5), ("exact", 1e-5), ("paper", None)])
@pytest.mark.parametrize("k", [1, 3])
def test_layer_fast_grad_matches_autograd_through_the_scaling(fast_grad, tol, k):
    torch.manual_seed(0)
    plain = SOCConv2d(6, k, train_terms=6).train()
    fast = copy.deepcopy(plain)  # same weights and the same persistent power-iteration vectors
    fast.fast_grad = fast_grad
    x = torch.randn(3, 6, 5, 7)
    g = torch.randn(3, 6, 5, 7)
    outs = []
    for layer in (plain, fast):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * g).sum().backward()
        outs.append((y.detach(), xi.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)  # forward identical
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-5, rtol=1e-5)  # input gradient exact
    for name in ("v0", "v1", "v2", "v3"):  # the training forward updated the buffers alike
        torch.testing.assert_close(getattr(fast, name), getattr(plain, name), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fast.bias.grad, plain.bias.grad, atol=1e-5, rtol=1e-5)
    ref, got = plain.weight.grad, fast.weight.grad
    rel = ((got - ref).norm() / ref.norm()).item()
    if tol is not None:
        assert (got - ref).abs().max() <= tol * ref.abs().max()
    elif k == 1:
        assert rel < 0.05  # paper mode: approximate (1×1: ‖L‖ = 1, the largest error)
    else:
        assert 1e-6 < rel < 0.05
    assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.99


def test_fast_grad_in_repr_state_dict_and_eval():
    torch.manual_seed(0)
    plain = SOCConv2d(4, 3)
    fast = SOCConv2d(4, 3, fast_grad="paper")
    assert "fast_grad=False" in repr(plain) and "fast_grad=paper" in repr(fast)
    assert "fast_grad=exact" in repr(SOCConv2d(4, 3, fast_grad=True))
    # An option, not state: the state dicts have the same keys and load across.
    assert plain.state_dict().keys() == fast.state_dict().keys()
    fast.load_state_dict(plain.state_dict())
    assert fast.fast_grad == "paper"
    x = torch.randn(2, 4, 5, 5)
    plain.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), atol=0, rtol=0)  # eval: the same code path
        torch.testing.assert_close(fast.export()(x), plain.export()(x), atol=0, rtol=0)


def test_lipnet_layer_options_reach_soc_train_one_step_and_export_alike():
    torch.manual_seed(0)
    ref = create_model("soc", "xxs", 1, 10, 8)
    fast = create_model("soc", "xxs", 1, 10, 8, layer_options={"fast_grad": True})
    socs = [m for m in fast.modules() if isinstance(m, SOCConv2d)]
    assert socs and all(m.grad_mode == "exact" for m in socs)
    assert fast.config["layer_options"] == {"fast_grad": True}
    fast.load_state_dict(ref.state_dict())
    x = torch.rand(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    for model in (ref, fast):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for (name, a), b in zip(fast.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    fast.eval(), ref.eval()
    torch.testing.assert_close(to_plain(fast)(x), to_plain(ref)(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="fast_grad must be"):
        create_model("soc", "xxs", 1, 10, 8, layer_options={"fast_grad": "yes"})


# -- the benchmark ------------------------------------------------------------------------------


def test_bench_runs_on_tiny_settings(tmp_path, capsys):
    from bench.soc_fast import main

    assert (
        main(
            [
                "--sizes",
                "",
                "--batch",
                "2",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--train-terms",
                "3",
                "--layer-channels",
                "4",
                "--layer-pixels",
                "4",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "soc_fast.json").read_text())
    assert result["device"] == "cpu" and result["train_terms"] == 3 and "machine" in result
    (row,) = result["rows"]
    assert row["name"] == "SOC layer c=4 4x4" and row["batch"] == 2 and row["input"] == [4, 4, 4]
    for key in ("autograd", "exact", "paper"):
        assert row[f"{key}_ms"] > 0 and row[f"{key}_saved_mb"] > 0 and row[f"{key}_peak_mb"] is None
    assert row["autograd_ratio"] == 1.0
    assert row["exact_grad_rel_err"] < 1e-5 < row["paper_grad_rel_err"] < 0.05
    assert row["paper_grad_cos"] > 0.99
    assert row["paper_saved_mb"] < row["exact_saved_mb"]  # one saved activation, not T
    assert "exact ÷ autograd" in capsys.readouterr().out
    assert main(["--sizes", "xxl"]) == 2
    assert main(["--batch", "0"]) == 2
