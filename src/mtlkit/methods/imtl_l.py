"""IMTL-L: the loss-balancing half of impartial multi-task learning (Liu et al., ICLR 2021)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import TaskSet
from mtlkit.methods.hparams import hparam, none, number
from mtlkit.methods.loss_weighting import LossWeighting
from mtlkit.methods.registry import register


class LearnableLossScales:
    """IMTL-L's learnable log-scales ``s`` (one per task, init 0) with an optional learning rate
    of their own; shared by IMTL-L and the IMTL hybrid."""

    needs_setup = True
    scales: nn.Parameter
    lr: float | None = hparam(
        None, number(gt=0) | none(), "learning rate of s (None: the optimiser's, as LibMTL)"
    )

    def _build(self, tasks: TaskSet) -> None:
        self.scales = nn.Parameter(torch.zeros(len(tasks)))

    def parameter_lr(self) -> float | None:
        return self.lr


@register("imtl_l")
class IMTLL(LearnableLossScales, LossWeighting):
    """IMTL-L, the loss-balancing half of Liu et al., "Towards Impartial Multi-task Learning",
    ICLR 2021.

    Each loss is replaced by ``exp(s_k) L_k - s_k`` with a learnable ``s_k`` (init 0), minimised
    jointly with the model; at the optimum in ``s``, ``exp(s_k) L_k = 1``: every scaled loss is 1.
    The reported weight of task k is ``exp(s_k)``. No official code was released; defaults follow
    LibMTL (init 0, the optimiser's learning rate). ``scales`` is created by :meth:`setup`.
    """

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        return torch.exp(self.scales.to(losses.device))

    def regularizer(self, active: Tensor) -> Tensor:
        return -torch.where(active.to(self.scales.device), self.scales, 0.0).sum()
