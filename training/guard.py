"""The NaN guard: keep states known to be followed by finite training, and walk back to them.

Every ``guard_every`` steps (one sync) and at the end of each epoch the loop checks the window's
loss and the weights. ``good`` holds states each followed by a finite window, newest last (the
first is the start); ``pending``, the latest finite state, joins them once the next window is
finite too. A restore that fails again at once discards the newest good state: a state can be
finite yet already doomed (huge weights), so consecutive failures walk back. Each restore halves
the learning rate scale.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

#: How many verified states are kept (the start and the newest ones).
GOOD_STATES = 4


def all_finite(model: nn.Module) -> bool:
    """Every parameter of ``model`` is finite."""
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


class NanGuard:
    """Snapshots of the model and optimizer, and the restore rule above.

    Args:
        model: the trained module (not the DDP wrapper).
        optimizer: its optimizer.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.pending = self._snapshot()
        self.good = [self.pending]
        self.failures_in_a_row = 0

    def _snapshot(self) -> dict[str, Any]:
        return dict(
            model=copy.deepcopy(self.model.state_dict()),
            optimizer=copy.deepcopy(self.optimizer.state_dict()),
        )

    def window_failed(self, window_loss: torch.Tensor) -> torch.Tensor:
        """``[0.]`` if the window's loss and the weights are finite, else ``[1.]`` (on its device,
        to be or-ed over the ranks)."""
        finite = torch.isfinite(window_loss) and all_finite(self.model)
        return torch.tensor([0.0 if finite else 1.0], device=window_loss.device)

    def accept(self) -> None:
        """The window was finite: the pending state becomes good, the current one pending."""
        self.failures_in_a_row = 0
        if self.pending is not self.good[-1]:
            self.good = [self.good[0], *self.good[1:][-(GOOD_STATES - 2) :], self.pending]
        self.pending = self._snapshot()

    def restore(self) -> None:
        """The window was not finite: load the newest good state (walking back on repeats)."""
        self.failures_in_a_row += 1
        if self.failures_in_a_row > 1 and len(self.good) > 1:
            self.good.pop()
        self.model.load_state_dict(self.good[-1]["model"])
        self.optimizer.load_state_dict(self.good[-1]["optimizer"])
        self.pending = self.good[-1]

    def restore_weights_if_diverged(self) -> bool:
        """After the last step: if the weights are not finite, load the newest good ones.

        Returns:
            True when it restored (a divergence within the last guard window).
        """
        if all_finite(self.model):
            return False
        self.model.load_state_dict(self.good[-1]["model"])
        return True
