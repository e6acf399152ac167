"""UPGrad: the mean of the task gradients projected onto the dual cone (Quinton & Rey, 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit.methods.dual_cone_weighting import DualConeWeighting
from mtlkit.methods.registry import register


@register("upgrad")
class UPGrad(DualConeWeighting):
    """UPGrad: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv
    2406.16232, 2024 (the aggregator of TorchJD).

    ``d = sum_k p_k pi(g_k)``, where ``pi`` projects onto the dual cone ``{y : <g_j, y> >= 0 for
    all j}``: each task gradient is minimally changed so that it conflicts with no task, and the
    results are averaged with the preference ``p`` (default ``1/K``). In the Gramian form of the
    paper's Proposition 1, ``w = sum_k v^(k)`` with ``v^(k) = argmin_{v >= p_k e_k} v^T G v``, and
    ``d = J^T w``; so ``G w >= 0`` (no task's loss increases to first order) and ``w >= p``.

    Departures from TorchJD: the K quadratic programs are solved exactly by an active-set method
    (:mod:`~mtlkit.methods.dual_cone`: batched block principal pivoting in float64 torch on the
    Gramian's device, warm-started from the previous step's free sets), so no ``reg_eps * I`` is
    needed (TorchJD adds ``1e-4 I``
    to the trace-normalised Gramian for quadprog; ``reg_eps=1e-4`` reproduces it) and the result
    is non-conflicting to round-off; the Gramian is normalised by its largest diagonal entry,
    which cannot change the exact solution (TorchJD's absolute ``norm_eps`` threshold, which turns
    UPGrad into the plain mean once ``trace(G) < 1e-4``, is not used). Heads get their own
    gradient (TorchJD's multi-task backward). Works at both levels (``level="representation"``:
    the projection is done in the representation's gradient space).
    """

    @staticmethod
    def projections(k: int) -> int:
        return k  # one per task

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        p = self.preference(gramian)
        rows = self.active_index if self.active_index is not None else torch.arange(len(p))
        return self.project(gramian, torch.diag(p), rows).sum(0)  # row k: v^(k), v >= p_k e_k
