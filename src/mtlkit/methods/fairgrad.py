"""FairGrad: alpha-fair allocation of the update among the tasks."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from mtlkit.core.engine import HeadGrad
from mtlkit.methods.alpha_fair import AlphaFairWeighting
from mtlkit.methods.hparams import hparam, none, number, one_of
from mtlkit.methods.registry import register


@register("fairgrad")
class FairGrad(AlphaFairWeighting):
    """FairGrad: Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024.

    The update ``d = J^T w`` maximises the alpha-fair utility of the tasks' improvements
    ``<g_k, d>``; its weights solve ``G w = w^(-1/alpha)`` (task k gets ``<g_k, d> =
    w_k^(-1/alpha)``). ``alpha = 1`` is Nash-MTL's bargaining solution, larger ``alpha`` is fairer
    (towards max-min), ``alpha -> 0`` approaches the plain sum.

    Official conventions (OptMN-Lab/fairgrad): the shared gradient is ``K J^T w`` ("to match the
    sum loss": ``scale="num_tasks"``), heads get their own gradient, the shared gradient's norm is
    clipped to ``max_norm = 1``. ``alpha`` defaults to the official class default 1.0; the
    official run scripts behind the paper's NYUv2, Cityscapes, QM9 and CelebA tables use
    ``alpha=2.0``. LibMTL's port instead back-propagates ``sum_k w_k L_k`` (``scale=1``,
    ``head_grad="weighted"``, ``max_norm=None``).

    Departure: the official and LibMTL solve the equation with SciPy's ``least_squares`` on the
    host and never check its convergence; here Newton's method on the equation's convex potential
    reaches it to round-off (:mod:`~mtlkit.methods.alpha_fair`), warm-started from the previous
    step. Zero-gradient tasks get weight 0 (they can get no positive share; the official pushes
    their weight to the box bound). The final relative residual is reported in
    ``StepInfo.extras['residual']``.
    """

    alpha: float = hparam(1.0, number(gt=0), "fairness (official class default 1.0; paper runs: 2.0)")
    head_grad: HeadGrad = hparam("own", one_of("own", "weighted"), "heads get their own gradient (official)")
    scale: float | Literal["num_tasks"] = hparam(
        "num_tasks", number(gt=0) | one_of("num_tasks"), "factor on J^T w (official K: 'num_tasks'; LibMTL 1)"
    )
    max_norm: float | None = hparam(
        1.0, number(gt=0) | none(), "clip the shared gradient's norm (official 1.0; None: no clipping)"
    )

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        w = self.fair_weights(gramian, float(self.alpha))
        factor = float(len(self.previous)) if self.scale == "num_tasks" else float(self.scale)
        return w * factor
