"""The preference a preference-conditioned model reads: a buffer set between forward passes."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtlkit.core.preferences import check_preference


class TakesPreference(nn.Module):
    """Mixin of the models whose output depends on a preference over the tasks (COSMOS's input
    conditioning, Pareto hypernetworks). The preference is the buffer ``preference`` (uniform at
    first, saved with the model), changed by :meth:`set_preference`; every forward pass reads the
    current one, so one model gives the whole front by sweeping it."""

    preference: Tensor

    def _init_preference(self, tasks: int) -> None:
        self.register_buffer("preference", torch.full((tasks,), 1.0 / tasks))

    def set_preference(self, preference: Tensor | list[float]) -> None:
        """Condition the following forward passes on ``preference`` (one non-negative entry per
        task; normalised to sum 1)."""
        r = check_preference(preference, tasks=len(self.preference))
        self.preference.copy_(r.to(self.preference))
