"""Materialization: a trained network as plain inference modules (no parametrization runs).

``to_plain(model)`` is ``model.export()`` in eval mode without gradients: every layer computes
its orthogonalized / rescaled weights once and returns plain modules (:mod:`models.plain`,
``nn.Conv2d``, ``nn.Linear``, :mod:`models.blocks`). The ONNX file, its metadata, its audit and
its loading live in :mod:`certify.artifact`.
"""

from __future__ import annotations

import torch
from torch import nn


def to_plain(model: nn.Module) -> nn.Module:
    """The plain inference network ``model.export()``, in eval mode, without gradients.

    The model is exported in eval mode (layers may refine estimates there) and its own mode is
    restored afterwards.

    Raises:
        TypeError: the model has no ``export()``.
    """
    if not hasattr(model, "export"):
        raise TypeError(f"{type(model).__name__} has no export(); expected a LipNet or a layer")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            plain = model.export()
    finally:
        model.train(was_training)
    plain.eval()
    plain.requires_grad_(False)
    return plain


__all__ = ["to_plain"]
