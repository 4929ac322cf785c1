"""Registries: the methods (``register_method``, ``list_methods``, ``layer_class``,
``create_layer``) and the network family (``register_network``, ``create_model``).

This module imports no other lipcert module: the layers and the network register themselves here
when :mod:`models` is imported, so ``create_model`` finds them without an import circle.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

_METHODS: dict[str, type[nn.Module]] = {}
_NETWORKS: dict[str, Callable[..., nn.Module]] = {}
#: The network family :func:`create_model` builds unless told otherwise.
DEFAULT_NETWORK = "lipnet"


def check_name(kind: str, name: object, allowed: Sequence[str], *, optional: bool = False) -> None:
    """Raise ``ValueError("unknown <kind> <name>; choose from <allowed>")`` unless ``name`` is one.

    Args:
        kind: what is named (``"head"``, ``"pool"`` …), for the message.
        name: the value given.
        allowed: the accepted names.
        optional: ``None`` is accepted too (listed as ``none``).
    """
    if optional and name is None:
        return
    if name not in allowed:
        choices = ["none", *allowed] if optional else list(allowed)
        raise ValueError(f"unknown {kind} {name!r}; choose from {', '.join(choices)}")


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


def check_layer_options(method: str, options: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the options ``method``'s layer does not take (keyword-only)."""
    params = inspect.signature(layer_class(method).__init__).parameters
    allowed = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown layer option(s) {', '.join(unknown)} for {method}; "
            f"choose from {', '.join(allowed) or 'none'}"
        )


def create_layer(method: str, channels: int, kernel_size: int = 3, **options: Any) -> nn.Module:
    """Build one square convolution of ``method`` (has ``.export()``)."""
    return layer_class(method)(channels, kernel_size, **options)


def register_network(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register a network family (constructor ``(method, size, ...)``)."""

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        _NETWORKS[name] = cls
        return cls

    return decorate


def create_model(
    method: str,
    size: str = "xs",
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    **options: Any,
) -> nn.Module:
    """Build the comparison paper's LipNet for ``method`` and ``size`` (see
    :class:`models.network.LipNet` for the options)."""
    return _NETWORKS[DEFAULT_NETWORK](method, size, in_channels, num_classes, image_size, **options)
