"""GLS: the geometric loss strategy (geometric mean of the losses)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit.methods.loss_weighting import LossWeighting
from mtlkit.methods.registry import register


@register("gls")
class GLS(LossWeighting):
    """Geometric loss strategy: minimise ``(prod_k L_k)^(1/K)``.

    Chennupati, Sistu, Yogamani, Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and
    Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019. The gradient is
    ``sum_k GM / (K L_k) g_k`` with ``GM`` the geometric mean, which is computed in log space
    (``exp(mean log L_k)``) so that it neither underflows nor overflows at large K. The direction
    equals SI's; only the step length differs. Tasks without a labelled sample in the batch are
    left out of the mean (K counts the labelled tasks).

    Every labelled task's loss must be > 0 (:class:`~mtlkit.errors.NonPositiveLossError`).
    """

    positive_losses = True

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        log = torch.where(active, losses, torch.ones_like(losses)).log()
        count = active.sum().clamp_min(1)
        log_gm = torch.where(active, log, 0.0).sum() / count
        return torch.exp(log_gm - log) / count
