"""Attack check: PGD (L2) inside each certified ball must never change an ONNX prediction.

For every certified point ``x`` (radius ``r > 0`` from the ONNX Runtime logits and the
certificate the load proved), projected gradient ascent on the torch twin
(:attr:`certify.artifact.Artifact.twin`) maximizes the margin loss ``max_{j≠y} z_j − z_y`` of
the predicted class ``y`` over ``‖δ‖₂ ≤ 0.999·r`` (and ``x + δ`` in [0, 1]). Every iterate's
best point is then re-run in ONNX Runtime: a changed argmax there is a *flip*, a counterexample
to the certificate. A sound model gives zero flips; the test suite checks that a model whose
weights were scaled after its bound was computed does flip, so the check can fail.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: Fraction of the certified radius the perturbation may use.
RADIUS_FRACTION = 0.999


def _as_float_images(images: Any) -> np.ndarray:
    arr = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return arr.astype(np.float32)


def _margin(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max_{j≠y} z_j − z_y`` per row (positive = prediction changed)."""
    z_y = z.gather(1, y[:, None])[:, 0]
    others = z.scatter(1, y[:, None], float("-inf"))
    return others.max(dim=1).values - z_y


def _project(delta: torch.Tensor, x: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = torch.clamp(cap / norms, max=1.0).view(-1, *([1] * (delta.ndim - 1)))
    delta = delta * factor
    # Clipping to the image box can only shrink the norm, so the cap still holds.
    return (x + delta).clamp(0.0, 1.0) - x


def _pgd(
    twin: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cap: torch.Tensor,
    *,
    steps: int,
    restarts: int,
    step_fraction: float,
    seed: int,
) -> torch.Tensor:
    """L2 PGD on the margin loss: the best perturbation found per point, ``‖δ‖ <= cap``."""
    gen = torch.Generator().manual_seed(seed)
    best_delta = torch.zeros_like(x)
    best_loss = torch.full((len(x),), float("-inf"))
    view = (-1, *([1] * (x.ndim - 1)))
    for _ in range(restarts):
        delta = torch.randn(x.shape, generator=gen)
        delta = delta / delta.flatten(1).norm(dim=1).view(view) * (cap.view(view) * 0.5)
        delta = _project(delta, x, cap)
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = _margin(twin(x + delta), y)
            (grad,) = torch.autograd.grad(loss.sum(), delta)
            with torch.no_grad():
                better = loss.detach() > best_loss
                best_loss = torch.where(better, loss.detach(), best_loss)
                best_delta[better] = delta.detach()[better]
                g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
                delta = _project(delta.detach() + step_fraction * cap.view(view) * g, x, cap)
        with torch.no_grad():
            loss = _margin(twin(x + delta), y)
            better = loss > best_loss
            best_loss = torch.where(better, loss, best_loss)
            best_delta[better] = delta[better]
    return best_delta


def _verdict(artifact: Any, x_adv: torch.Tensor, y: torch.Tensor, rel: torch.Tensor) -> dict:
    """Re-run the attacked points in ONNX Runtime: flips, largest ``‖δ‖/r``, smallest margin."""
    adv_logits = artifact.logits(x_adv.numpy().astype(np.float32)).astype(np.float64)
    yn = y.numpy()
    rows = np.arange(len(yn))
    others = adv_logits.copy()
    others[rows, yn] = -np.inf
    margin_left = adv_logits[rows, yn] - others.max(axis=1)
    return dict(
        flipped=int((adv_logits.argmax(axis=1) != yn).sum()),
        max_relative_norm=float(rel.numpy().max()),
        min_margin_left=float(margin_left.min()),
    )


def attack_check(
    onnx_path: str | Path | Any,
    images: Any,
    labels: Any = None,
    *,
    steps: int = 100,
    restarts: int = 2,
    step_fraction: float = 0.25,
    max_points: int | None = None,
    verify_hash: bool = True,
    seed: int = 0,
    radii: Any = None,
) -> dict[str, Any]:
    """Try to flip certified predictions with PGD inside their certified L2 balls.

    Args:
        onnx_path: a lipcert ONNX file, or an already loaded :class:`certify.artifact.Artifact`.
        images: ``(N, C, H, W)`` uint8 in [0, 255] or float in [0, 1].
        labels: optional ``(N,)`` labels; when given, only correctly classified certified points
            are attacked (those that count in the certified accuracy).
        steps: PGD steps per restart.
        restarts: random starts per point (the first restart starts at a random direction too).
        step_fraction: L2 step length as a fraction of each point's cap.
        max_points: attack at most this many certified points (the first ones).
        verify_hash: load the file through :func:`certify.artifact.load` (the re-audit; the
            radii use the proven certificate); ``False`` only to test the check itself on a
            deliberately tampered file (then the file's *stated* certificate is attacked).
        seed: seed of the random starts.
        radii: optional ``(N,)`` radii to check instead of the file's stored certificate (e.g.
            :func:`certify.curvature.curvature_radius` of a CRC-Lip model).

    Returns:
        ``{"points", "certified", "attacked", "flipped", "max_relative_norm", "min_margin_left"}``:
        ``flipped`` must be 0 for a sound certificate; ``max_relative_norm`` is the largest
        ``‖δ‖ / r`` used (≤ 0.999); ``min_margin_left`` the smallest ONNX margin after attack.

    Raises:
        ValueError: on bad arguments.
        certify.artifact.ModelVerificationError: a refused file (when ``verify_hash``).
    """
    from certify.artifact import Artifact, load, open_unverified
    from certify.radius import certified_radius

    if steps < 1 or restarts < 1:
        raise ValueError(f"steps and restarts must be >= 1, got {steps}, {restarts}")
    if not 0 < step_fraction <= 1:
        raise ValueError(f"step_fraction must be in (0, 1], got {step_fraction}")
    if isinstance(onnx_path, Artifact):
        artifact = onnx_path
    elif verify_hash:
        artifact = load(onnx_path, threads=1)
    else:
        artifact = open_unverified(onnx_path)
    twin = artifact.twin

    x_all = _as_float_images(images)
    logits = artifact.logits(x_all)
    if radii is None:
        radius = certified_radius(logits, **artifact.certificate_kwargs())
    else:
        radius = np.asarray(
            radii.detach().cpu() if torch.is_tensor(radii) else radii, dtype=np.float64
        )
        if radius.shape != (len(x_all),):
            raise ValueError(f"radii must have shape ({len(x_all)},), got {radius.shape}")
    pred = logits.argmax(axis=1)
    chosen = radius > 0
    if labels is not None:
        y_true = labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
        chosen &= pred == y_true
    idx = np.flatnonzero(chosen)
    certified = int(idx.size)
    if max_points is not None:
        idx = idx[:max_points]
    out: dict[str, Any] = dict(
        points=int(len(x_all)), certified=certified, attacked=int(idx.size), flipped=0,
        max_relative_norm=0.0, min_margin_left=None,
    )
    if idx.size == 0:
        return out

    x = torch.from_numpy(x_all[idx])
    y = torch.from_numpy(pred[idx]).long()
    r = torch.from_numpy(radius[idx]).to(torch.float32)
    cap = r * RADIUS_FRACTION
    best_delta = _pgd(twin, x, y, cap, steps=steps, restarts=restarts,
                      step_fraction=step_fraction, seed=seed)
    out.update(_verdict(artifact, x + best_delta, y, best_delta.flatten(1).norm(dim=1) / r))
    if out["flipped"]:
        logger.warning("%s: %d certified points flipped inside their radius",
                       onnx_path, out["flipped"])
    return out


__all__ = ["RADIUS_FRACTION", "attack_check"]
