"""Method registry: ``register_method``, ``list_methods``, ``create_layer``, ``create_model``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_METHODS: dict[str, type[nn.Module]] = {}


def register_method(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register a convolution layer under a lower-case method name."""
    if name != name.lower():
        raise ValueError(f"method names are lower case, got {name!r}")

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered to {_METHODS[name].__name__}")
        _METHODS[name] = cls
        cls.method = name
        return cls

    return decorate


def list_methods() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_METHODS)


def layer_class(method: str) -> type[nn.Module]:
    """The layer class of ``method``; a clear ``ValueError`` for unknown names."""
    if not isinstance(method, str) or method.lower() not in _METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(list_methods())}")
    return _METHODS[method.lower()]


def create_layer(method: str, channels: int, kernel_size: int = 3, **options: Any) -> nn.Module:
    """Build one square convolution of ``method`` (has ``.export()``)."""
    return layer_class(method)(channels, kernel_size, **options)


def create_model(
    method: str,
    size: str = "xs",
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    **options: Any,
) -> nn.Module:
    """Build the comparison paper's LipNet for ``method`` and ``size`` (see :class:`LipNet`)."""
    from models.network import LipNet

    return LipNet(method, size, in_channels, num_classes, image_size, **options)
