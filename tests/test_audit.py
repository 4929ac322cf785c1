"""Audit: proven per-layer bounds are upper bounds of the exact norms, tight where exact."""

from __future__ import annotations

import pytest
import torch
from lipschitz_utils import jacobian_matrix

from certify.audit import audit, layer_bound, power_iteration_lower
from models import plain
from models.registry import create_layer, list_methods

SHAPE = (4, 8, 8)
#: Methods whose exported layer is a circular convolution, audited exactly.
EXACT = ("aol", "bcop", "standard")
#: Residual (nonlinear) layers: compare with Jacobian norms at random points.
RESIDUAL = ("cpl", "sll")


def exported(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = create_layer(method, 4, 3)
    layer.eval()
    with torch.no_grad():
        layer(torch.zeros((1, *SHAPE)))  # size-dependent layers (Cayley, LOT) learn the input size
        return layer.export().eval()


def audited_bound(module: torch.nn.Module) -> float:
    try:
        return layer_bound(module, SHAPE)[0]
    except TypeError:  # a Sequential of leaves: the audit multiplies their rules
        return audit(module, SHAPE, lower=False).bound


def jacobian_norm(module: torch.nn.Module, x: torch.Tensor) -> float:
    import copy

    return float(torch.linalg.matrix_norm(jacobian_matrix(copy.deepcopy(module), x), ord=2))


@pytest.mark.parametrize("method", list_methods())
def test_bound_is_upper_bound(method):
    module = exported(method)
    bound = audited_bound(module)
    gen = torch.Generator().manual_seed(1)
    points = 3 if method in RESIDUAL else 1
    norms = [jacobian_norm(module, torch.randn((1, *SHAPE), generator=gen)) for _ in range(points)]
    assert bound >= max(norms) * (1 - 1e-9)
    if method in EXACT:
        assert bound == pytest.approx(norms[0], abs=1e-3)


@pytest.mark.parametrize("method", EXACT)
def test_scaled_weight_scales_bound(method):
    module = exported(method)
    before = audited_bound(module)
    convs = [m for m in module.modules() if isinstance(m, (plain.CircularConv2d, torch.nn.Conv2d))]
    assert convs
    with torch.no_grad():
        convs[0].weight.mul_(3.0)
    after = audited_bound(module)
    assert after >= 3 * before * (1 - 1e-6)  # float32 weights: the product rounds
    x = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(2))
    assert after >= jacobian_norm(module, x) * (1 - 1e-9)


def test_unknown_layer_refused():
    with pytest.raises(TypeError, match="no Lipschitz rule"):
        layer_bound(torch.nn.Tanh(), SHAPE)


# -- structures the audit does not prove are refused, not given a number ------------------------
def _conv(scale: float = 2.0) -> torch.nn.Conv2d:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(scale)
    return conv.requires_grad_(False)


def test_a_module_used_twice_counts_twice() -> None:
    from collections import OrderedDict

    conv = _conv()
    once = audit(torch.nn.Sequential(conv), SHAPE, lower=False).bound
    twice = audit(torch.nn.Sequential(OrderedDict(a=conv, b=conv)), SHAPE, lower=False).bound
    assert twice == pytest.approx(once**2, rel=1e-12) and once > 1


def test_extra_children_beside_body_and_head_are_refused() -> None:
    from collections import OrderedDict

    from certify.audit import AuditError

    net = torch.nn.Sequential(OrderedDict(
        body=torch.nn.Sequential(torch.nn.Identity()), head=torch.nn.Flatten(),
        extra=_conv(),
    ))
    with pytest.raises(AuditError, match="not audited"):
        audit(net, SHAPE, lower=False)


def test_a_leaf_called_more_often_than_it_appears_is_refused() -> None:
    from certify.audit import AuditError

    inner = _conv()
    hidden_call = torch.nn.Sequential(torch.nn.Identity(), inner)
    hidden_call.register_forward_hook(lambda module, args, out: inner(out))  # a second use
    with pytest.raises(AuditError, match="called 2 times but appears 1 times"):
        audit(hidden_call, SHAPE, lower=False)

    class Twice(plain.CircularConv2d):  # defined outside models: its own rule is not trusted
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(super().forward(x))

    with pytest.raises(TypeError, match="no Lipschitz rule"):
        audit(torch.nn.Sequential(Twice(inner.weight)), SHAPE, lower=False)


def test_a_foreign_self_described_bound_is_not_trusted() -> None:
    class Liar(torch.nn.Module):
        def lipschitz_upper_bound(self) -> float:
            return 0.5

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 10 * x

    with pytest.raises(TypeError, match="no Lipschitz rule"):
        audit(torch.nn.Sequential(Liar()), SHAPE, lower=False)


class _OnceDifferentiableLinear(torch.autograd.Function):
    """``x ↦ x Wᵀ`` with a backward that cannot be differentiated again (and a forward mode)."""

    @staticmethod
    def forward(x, weight):
        return x @ weight.T

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.weight = inputs[1]

    @staticmethod
    def jvp(ctx, x_tangent, weight_tangent):
        return x_tangent @ ctx.weight.T

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight, None


@pytest.mark.parametrize("once_differentiable", [False, True])
def test_power_iteration_reaches_the_norm_of_a_known_jacobian(once_differentiable) -> None:
    # A linear map has J = W everywhere. Both AD paths (the double backward, and forward mode
    # where a backward is once_differentiable) must reach ‖W‖ from below.
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(48, 48, generator=gen, dtype=torch.float64)
    norm = float(torch.linalg.matrix_norm(weight, ord=2))

    class Linear(torch.nn.Module):
        def forward(self, x):
            flat = x.flatten(1)
            w = weight.to(flat.dtype)
            y = _OnceDifferentiableLinear.apply(flat, w) if once_differentiable else flat @ w.T
            return y.view_as(x)

    lower = power_iteration_lower(Linear(), (3, 4, 4), steps=200, points=1)
    assert norm * (1 - 1e-6) <= lower <= norm * (1 + 1e-12)
