"""SI: scale-invariant linear scalarisation (the sum of log losses)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit.methods.loss_weighting import LossWeighting
from mtlkit.methods.registry import register


@register("si")
class SI(LossWeighting):
    """Scale-invariant linear scalarisation: minimise ``sum_k log L_k``.

    The baseline "SI" of Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022. Its
    gradient is ``sum_k g_k / L_k``, so the effective weights are ``w_k = 1 / L_k`` (detached) and
    the update direction does not change when a loss is multiplied by a positive constant (it does
    change under non-affine transforms such as ``L -> L + L^2``).

    Every labelled task's loss must be > 0: a loss <= 0 raises
    :class:`~mtlkit.errors.NonPositiveLossError` before anything is updated.
    """

    positive_losses = True

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        return 1.0 / torch.where(active, losses, torch.ones_like(losses))
