"""Equal weighting / linear scalarisation."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtlkit.errors import TaskError
from mtlkit.methods.base import LossWeighting
from mtlkit.methods.registry import register


@register("ew")
class EW(LossWeighting):
    """Equal weighting (linear scalarisation): one backward of ``sum_k c_k L_k``.

    The baseline of every MTL comparison (e.g. Navon et al., "Multi-Task Learning as a Bargaining
    Game", ICML 2022; Lin et al., "Reasonable Effectiveness of Random Weighting", TMLR 2022). As in
    the official Nash-MTL, FAMO and LibMTL code the losses are SUMMED (``c_k = 1``), not averaged;
    with SGD this sets the effective learning rate, with Adam it hardly matters.

    Args:
        weights: optional fixed weights ``c_k`` (a sequence in task order, or ``{task: weight}``;
            tasks left out of a mapping keep weight 1). ``Task(weight=...)`` values are passed here
            by the Trainer.
    """

    name = "ew"

    def __init__(self, weights: Sequence[float] | Mapping[str, float] | None = None) -> None:
        super().__init__()
        if weights is not None:
            vals = weights.values() if isinstance(weights, Mapping) else weights
            if any(not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 for v in vals):
                raise TaskError(f"EW weights must be finite numbers >= 0, got {weights!r}.")
        self.fixed = weights
        self._resolved: Tensor | None = None

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        if self._resolved is None or self._resolved.device != losses.device:
            self._resolved = self._resolve(len(losses), losses.device)
        return torch.where(active, self._resolved, torch.zeros_like(self._resolved))

    def _resolve(self, k: int, device: torch.device) -> Tensor:
        if self.fixed is None:
            vals = [1.0] * k
        elif isinstance(self.fixed, Mapping):
            unknown = set(self.fixed) - set(self.task_names or [])
            if unknown:
                raise TaskError(
                    f"EW weights name unknown tasks {sorted(unknown)}; tasks are {self.task_names}."
                )
            vals = [float(self.fixed.get(n, 1.0)) for n in self.task_names or []]
        else:
            vals = [float(v) for v in self.fixed]
            if len(vals) != k:
                raise TaskError(f"EW got {len(vals)} fixed weights for {k} tasks.")
        return torch.tensor(vals, device=device)

    def __repr__(self) -> str:
        return "EW()" if self.fixed is None else f"EW(weights={self.fixed!r})"
