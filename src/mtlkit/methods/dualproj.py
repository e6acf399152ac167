"""DualProj: the weighted mean of the task gradients projected onto their dual cone."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit.methods.dual_cone_weighting import DualConeWeighting
from mtlkit.methods.registry import register


@register("dualproj")
class DualProj(DualConeWeighting):
    """DualProj: the projection of Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual
    Learning", NeurIPS 2017 (eq. 11), used as a multi-task aggregator as in TorchJD (Quinton &
    Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232, 2024).

    ``d = pi(J^T p)``: the weighted mean of the task gradients (preference ``p``, default
    ``1/K``), minimally changed so that it conflicts with no task (``pi`` projects onto the dual
    cone ``{y : J y >= 0}``). In Gramian form ``w = argmin_{v >= p} v^T G v`` and ``d = J^T w``;
    the KKT conditions are ``w >= p``, ``G w >= 0`` and ``(w - p)_k (G w)_k = 0``.

    Departures from TorchJD as for :class:`~mtlkit.methods.upgrad.UPGrad`: the QP is solved
    exactly (batched block principal pivoting, :mod:`~mtlkit.methods.dual_cone`) with no
    ``1e-4 I`` ridge (``reg_eps=1e-4`` reproduces TorchJD's) and no absolute ``norm_eps``
    threshold on the trace. Heads get their own gradient. Works at both levels.
    """

    @staticmethod
    def projections(k: int) -> int:
        return 1

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        p = self.preference(gramian)
        return self.project(gramian, p[None], torch.zeros(1, dtype=torch.long))[0]
