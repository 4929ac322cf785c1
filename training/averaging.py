"""Weight averaging: an exponential moving average (EMA) of the trained parameters.

The average is what gets evaluated, exported and audited at the end of a run when
``TrainConfig.ema_decay`` is set. It is sound for every method in lipcert: each keeps its
Lipschitz constraint inside the layer's parametrization (the raw parameters are free), so an
average of raw parameters is again a valid parameter set, and the exported file's bound is audited
from the materialized weights regardless (SOC's truncation error included).

The average is updated when the NaN guard accepts a window (every ``guard_every`` steps and at the
end of each epoch), never from a window that failed, with the per-step decay raised to the number
of steps since the last update. It starts from zero with Adam's bias correction, so the initial
weights do not linger in short runs: after ``t`` steps it is
``Σ_i d^(t-i)·(1-d)·w_i / (1 - d^t)`` over the accepted states.
"""

from __future__ import annotations

import torch
from torch import nn


class WeightAverage:
    """The EMA of ``model``'s parameters (buffers are taken from the model as they are).

    Args:
        model: the trained module (not the DDP wrapper).
        decay: per-step decay ``d`` in (0, 1); the average's time constant is about
            ``1/(1-d)`` steps (0.999: the last thousand steps).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.model, self.decay = model, float(decay)
        self.average = {
            name: torch.zeros_like(p, dtype=torch.float32) for name, p in self._params()
        }
        self.steps = 0  # steps folded into the average so far
        self.weight = 0.0  # 1 - d^steps: the bias correction

    def _params(self):
        return ((n, p) for n, p in self.model.named_parameters() if p.is_floating_point())

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the model's current parameters, standing for the steps since the last update
        up to ``step`` (global step count)."""
        k = step - self.steps
        if k <= 0:
            return
        keep = self.decay**k
        for name, p in self._params():
            self.average[name].mul_(keep).add_(p.detach().float(), alpha=1.0 - keep)
        self.weight = 1.0 - (1.0 - self.weight) * keep
        self.steps = step

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Load the (bias-corrected) average into the model; a no-op before the first update.
        Toggles train mode so that layers drop weights cached from the old parameters."""
        if self.weight <= 0.0:
            return
        for name, p in self._params():
            p.copy_(self.average[name] / self.weight)
        self.model.train(self.model.training)

    def state_dict(self) -> dict:
        return dict(average=self.average, steps=self.steps, weight=self.weight)

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.average) - set(state["average"])
        if missing:
            raise ValueError(f"the checkpoint's weight average lacks {sorted(missing)[:3]}")
        for name in self.average:
            self.average[name].copy_(state["average"][name])
        self.steps, self.weight = int(state["steps"]), float(state["weight"])
