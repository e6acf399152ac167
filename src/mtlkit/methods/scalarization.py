"""Stateless log-loss scalarisations: SI (sum of log losses) and GLS (geometric mean)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit.methods.base import LossWeighting
from mtlkit.methods.registry import register


@register("si")
class SI(LossWeighting):
    """Scale-invariant linear scalarisation: minimise ``sum_k log L_k``.

    The baseline "SI" of Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022. Its
    gradient is ``sum_k g_k / L_k``, so the effective weights are ``w_k = 1 / L_k`` (detached) and
    the update direction does not change when a loss is multiplied by a positive constant (it does
    change under non-affine transforms such as ``L -> L^2``).

    Every labelled task's loss must be > 0: a loss <= 0 raises
    :class:`~mtlkit.errors.NonPositiveLossError` before anything is updated.
    """

    name = "si"
    positive_losses = True

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        return torch.where(active, 1.0 / torch.where(active, losses, torch.ones_like(losses)), 0.0)


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

    name = "gls"
    positive_losses = True

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        safe = torch.where(active, losses, torch.ones_like(losses))
        count = active.sum().clamp_min(1)
        log_gm = torch.where(active, safe.log(), 0.0).sum() / count
        return torch.where(active, torch.exp(log_gm - safe.log()) / count, 0.0)
