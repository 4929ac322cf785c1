"""LipNet: the network family of Prach, Brau, Buttazzo & Lampert, "1-Lipschitz Layers Compared:
Memory, Speed, and Certifiable Robustness", CVPR 2024, arXiv:2311.16833.

Layout (CIFAR, 3×32×32, width ``w``)::

    InputCentering(mean)                      # std stays 1: bounds in [0,1]-pixel units
    ZeroChannelConcat(w) → conv1x1(w) → MaxMin
    5 blocks, block i at c = w·2^i channels and 32/2^i pixels:
        depth × [conv c→c (k=3, or k=1 once the map is 2×2 or smaller) → MaxMin]
        FirstChannels(c/2) → PixelUnshuffle(2)          # → 2c channels, half the size
    head: conv1x1 at 32w channels → FirstChannels(num_classes) → flatten

Other image sizes: the input is zero-padded up to the next power of two (Fashion-MNIST 28 → 32,
an isometry, so certificates are unchanged), and the number of blocks is log2 of that size
(digits 8×8 → 3 blocks, 32×32 → 5, TinyImageNet 64×64 → 6). Above 32 pixels the base width is
scaled by 32/size, as the paper does for TinyImageNet (w = 8/16/32/64), so the head width and
the parameter budget stay those of the 32×32 network.

Methods whose layer carries its own activation (Sandwich: ``includes_activation``) get no
MaxMin after it, and a layer class may give its head conv other options (``head_options``:
Sandwich's head is its linear form); see docs/new_methods.md.

Sizes: XS/S/M/L have width 16/32/64/128 and depth 5, as in the paper. ``xxs`` (width 8, depth 3)
is lipcert's CPU-sized preset: on a 2-core CPU and a minutes-long budget a thin, shallow net sees
more epochs and ends more accurate than XS.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.activations import ACTIVATIONS, create_activation
from models.blocks import FirstChannels, Flatten, InputCentering, ZeroChannelConcat, ZeroPad
from models.heads import HEADS, create_head
from models.pooling import POOLS, create_pool
from models.registry import check_name, layer_class, register_network


@dataclass(frozen=True)
class SizePreset:
    """Width (channels of the first block) and depth (convs per block) of a named size."""

    width: int
    depth: int


SIZES: dict[str, SizePreset] = {
    "xxs": SizePreset(width=8, depth=3),
    "xs": SizePreset(width=16, depth=5),
    "s": SizePreset(width=32, depth=5),
    "m": SizePreset(width=64, depth=5),
    "l": SizePreset(width=128, depth=5),
}


def list_sizes() -> list[str]:
    return list(SIZES)


def check_options(*, head: str, activation: str, pool: str | None) -> None:
    """Raise ``ValueError`` naming a head, activation or pool LipNet does not know."""
    check_name("head", head, HEADS)
    check_name("activation", activation, ACTIVATIONS)
    check_name("pool", pool, POOLS, optional=True)


def _export_module(module: nn.Module) -> nn.Module:
    """The plain form of one module: its ``export()`` if it has one, else a copy of it."""
    if hasattr(module, "export"):
        return module.export()
    if isinstance(module, nn.Sequential):
        return nn.Sequential(
            OrderedDict((n, _export_module(m)) for n, m in module.named_children())
        )
    import copy

    return copy.deepcopy(module)


@register_network("lipnet")
class LipNet(nn.Module):
    """The comparison paper's network for one method.

    Args:
        method: registered method name (``models.list_methods()``).
        size: ``xxs``, ``xs``, ``s``, ``m`` or ``l`` (see module docstring).
        in_channels: input channels (1 or 3 typically).
        num_classes: number of logits kept from the head.
        image_size: input height = width in pixels.
        mean: per-channel input mean in [0, 1] (default 0.5 each); the std is never divided.
        width, depth: override the size preset.
        layer_options: extra keyword options for every conv of the method.
        head: ``"linear"`` (the paper's 1x1 conv of the method, default), ``"lln"`` (last-layer
            normalization) or ``"crc"`` (CRC-Lip MLP); see :mod:`models.heads`.
        activation: ``"maxmin"`` (default) or ``"hh"`` (Householder, :mod:`models.activations`).
        pool: None (default) or ``"distance"``: the last block halves its channels with
            :class:`models.pooling.DistancePool` instead of ``FirstChannels``.

    Raises:
        ValueError: unknown method or size, or shapes that do not fit.
    """

    def __init__(
        self,
        method: str,
        size: str = "xs",
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        *,
        mean: Sequence[float] | None = None,
        width: int | None = None,
        depth: int | None = None,
        layer_options: dict[str, Any] | None = None,
        head: str = "linear",
        activation: str = "maxmin",
        pool: str | None = None,
    ) -> None:
        super().__init__()
        conv = layer_class(method)
        check_options(head=head, activation=activation, pool=pool)
        check_name("size", size, list(SIZES))
        if image_size < 2:
            raise ValueError(f"image_size must be >= 2, got {image_size}")
        preset = SIZES[size]
        padded = 2 ** math.ceil(math.log2(image_size))
        n_blocks = int(math.log2(padded))
        if width is not None:
            base = width
        else:
            base = preset.width if padded <= 32 else max(2, preset.width * 32 // padded)
        depth = preset.depth if depth is None else depth
        if base < in_channels or base % 2:
            raise ValueError(f"width {base} must be even and >= in_channels={in_channels}")
        head_channels = base * 2**n_blocks
        if num_classes > head_channels:
            raise ValueError(f"num_classes={num_classes} exceeds the head width {head_channels}")
        mean = [0.5] * in_channels if mean is None else list(mean)
        if len(mean) != in_channels:
            raise ValueError(f"mean has {len(mean)} entries for {in_channels} channels")
        opts = dict(layer_options or {})
        edge_opts = {**opts, **getattr(conv, "edge_options", {})}
        head_opts = {**edge_opts, **getattr(conv, "head_options", {})}
        # Sandwich carries its own ReLU: no activation module follows it, so none can be chosen.
        if getattr(conv, "includes_activation", False) and activation != "maxmin":
            raise ValueError(
                f"method {conv.method!r} carries its own activation; activation={activation!r} "
                "does not apply (use the default)"
            )

        self.config = dict(
            method=conv.method, size=size, in_channels=in_channels, num_classes=num_classes,
            image_size=image_size, mean=[float(v) for v in mean], width=base, depth=depth,
            layer_options=opts, head=head, activation=activation, pool=pool,
        )
        body: list[tuple[str, nn.Module]] = [("center", InputCentering(mean))]
        if padded != image_size:
            # Pad on the right/bottom too: pad (padded - image_size)//2 each side, the rest right.
            body.append(("pad", ZeroPad((padded - image_size) // 2)))
            if (padded - image_size) % 2:
                raise ValueError(f"image_size {image_size} cannot be padded evenly to {padded}")
        stem = conv(base, 1, **edge_opts)
        body += [("concat", ZeroChannelConcat(base)), ("stem", stem)]
        if not getattr(stem, "includes_activation", False):
            body.append(("stem_act", create_activation(activation, base)))
        for i in range(n_blocks):
            c, pixels = base * 2**i, padded // 2**i
            k = 3 if pixels >= 4 else 1
            layers: list[tuple[str, nn.Module]] = []
            for j in range(depth):
                # FFT methods (Cayley, LOT) export for a fixed size: tell them theirs.
                sized = {"input_size": pixels} if getattr(conv, "needs_input_size", False) else {}
                act = create_activation(activation, c)
                layers.append((f"conv{j}", conv(c, k, **opts, **sized)))
                if not getattr(layers[-1][1], "includes_activation", False):
                    layers.append((f"act{j}", act))
            # Singla & Feizi's distance pool summarizes channel pairs in the final reduction.
            last = pool is not None and i == n_blocks - 1
            first = create_pool(pool, c) if last else FirstChannels(c // 2)
            layers += [("first", first), ("down", nn.PixelUnshuffle(2))]
            body.append((f"block{i}", nn.Sequential(OrderedDict(layers))))
        self.body = nn.Sequential(OrderedDict(body))
        if head == "linear":
            self.head = nn.Sequential(
                OrderedDict(
                    conv=conv(head_channels, 1, **head_opts),
                    first=FirstChannels(num_classes),
                    flatten=Flatten(),
                )
            )
        else:  # Singla & Feizi heads (models.heads): LLN or CRC-Lip over the flattened features
            self.head = nn.Sequential(
                OrderedDict(head=create_head(head, head_channels, num_classes))
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [0, 1] -> (B, classes)
        return self.head(self.body(x))

    @torch.no_grad()
    def export(self) -> nn.Sequential:
        """The whole network as plain modules: ``Sequential(body=..., head=...)``."""
        return nn.Sequential(
            OrderedDict(body=_export_module(self.body), head=_export_module(self.head))
        )
