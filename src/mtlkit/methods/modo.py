"""MoDo: multi-objective gradient descent with double sampling."""

from __future__ import annotations

from torch import Tensor

from mtlkit.core.engine import HeadGrad
from mtlkit.methods.double_sampling import DoubleSamplingWeighting
from mtlkit.methods.hparams import hparam, number, one_of
from mtlkit.methods.min_norm import project_simplex
from mtlkit.methods.registry import register


@register("modo")
class MoDo(DoubleSamplingWeighting):
    """MoDo: Chen, Fernando, Ying, Chen, "Three-Way Trade-Off in Multi-Objective Learning:
    Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023 / JMLR 2024.

    One projected-gradient step per training step on the regularised min-norm objective, with the
    cross Gramian of two independent batches (an unbiased estimate of ``G``):
    ``lambda <- P(lambda - gamma (J_1 J_2^T lambda + rho lambda))`` (``P``: the exact projection
    onto the simplex; ``lambda`` starts at ``1/K`` and is kept across steps), then the update
    ``J_3^T lambda`` on a third batch (no factor K). Three batches per step
    (``batches_per_step = 3``); heads get the average of their own gradients over the three.

    Defaults from LibMTL's port of the official code (heshandevaka/Trade-Off-MOL, not available
    to us): ``gamma = 1e-3``, ``rho = 0.1``; TorchJD uses ``gamma = 0.1``. The update uses
    ``J_1 J_2^T lambda`` as written (not symmetrised).
    """

    gamma: float = hparam(1e-3, number(gt=0), "step size of lambda (LibMTL 1e-3; TorchJD 0.1)")
    rho: float = hparam(0.1, number(ge=0), "l2 regularisation of lambda's update")
    head_grad: HeadGrad = hparam("own", one_of("own"), "heads: the average of their own gradients")
    level = hparam("parameter", one_of("parameter"), "per-task gradients of the shared parameters")
    head_scale = 1.0 / 3.0

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        lam = self.carried_weights(gramian)
        lam = project_simplex(lam - self.gamma * (gramian @ lam + self.rho * lam))
        self.carry(lam)
        return lam
