"""The contract every lipcert convolution follows.

A layer is a square convolution (``c_in == c_out``) with the constructor shape
``(channels, kernel_size=3, *, bias=True, **method_options)``. ``forward`` is the training form
(the parametrization is recomputed so gradients flow); ``export()`` returns an inference form built
only from plain, ONNX-exportable modules (see :mod:`models.plain`) with the weights materialized.

In eval mode a layer may cache the parametrized weight (``self.cached``); the cache is dropped on
``train()`` and whenever a state dict is loaded, so it can never go stale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn


class LipschitzConv2d(nn.Module):
    """Base class of the method layers.

    Class attributes describe the guarantee (read by tests, docs and the audit):

    - ``padding``: ``"circular"`` or ``"zero"``.
    - ``lipschitz``: whether the layer is 1-Lipschitz by construction.
    - ``orthogonal``: whether it is (approximately) orthogonal, i.e. all singular values ~ 1.

    Args:
        channels: number of input (= output) channels.
        kernel_size: odd spatial kernel size (1 or 3 in the paper's networks).
        bias: whether to add a learned per-channel bias.
    """

    padding: ClassVar[str] = "circular"
    lipschitz: ClassVar[bool] = True
    orthogonal: ClassVar[bool] = False

    def __init__(self, channels: int, kernel_size: int = 3, *, bias: bool = True) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        self._cache: dict[Any, Any] = {}
        self._register_load_state_dict_pre_hook(_drop_cache_hook, with_module=True)

    # -- eval-mode cache -------------------------------------------------------------------
    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        """Return ``compute()``, memoized under ``key`` in eval mode without grad only."""
        if self.training or torch.is_grad_enabled():
            return compute()
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def clear_cache(self) -> None:
        self._cache.clear()

    def train(self, mode: bool = True) -> LipschitzConv2d:
        self.clear_cache()
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # device / dtype moves invalidate the cache too
        self.clear_cache()
        return super()._apply(fn, recurse)

    def init_bias_uniform(self) -> None:
        """Draw ``self.bias`` (when there is one) uniform in ``±1/√fan_in``, the comparison
        paper's convolution bias init."""
        bias = getattr(self, "bias", None)
        if bias is not None:
            bound = 1 / math.sqrt(self.channels * self.kernel_size**2)
            nn.init.uniform_(bias, -bound, bound)

    # -- contract --------------------------------------------------------------------------
    def export(self) -> nn.Module:
        """The inference form: plain modules, weights materialized (float64 where it matters)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, padding={self.padding}"


def _drop_cache_hook(module: nn.Module, *args: Any, **kwargs: Any) -> None:
    module.clear_cache()
