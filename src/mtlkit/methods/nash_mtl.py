"""Nash-MTL: the Nash bargaining solution of the tasks' gradient game."""

from __future__ import annotations

from torch import Tensor

from mtlkit.methods.alpha_fair import AlphaFairWeighting
from mtlkit.methods.hparams import hparam, none, number
from mtlkit.methods.registry import register


@register("nash_mtl")
class NashMTL(AlphaFairWeighting):
    """Nash-MTL: Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, "Multi-Task Learning
    as a Bargaining Game", ICML 2022.

    The weights ``alpha > 0`` solve the bargaining equation ``alpha_k (G alpha)_k = 1``: with
    ``d = J^T alpha`` every task gets ``<g_k, d> = 1 / alpha_k``. The direction is invariant to a
    positive rescaling of any one task's gradient (``alpha_k`` absorbs it). As in the official code
    the weighted loss ``sum_k alpha_k L_k`` is back-propagated (heads get ``alpha_k`` times their
    gradient) and the shared gradient's norm is clipped to ``max_norm = 1``; heads are not clipped.
    ``update_every`` is the official ``update_weights_every`` (default 1).

    Departure from the official code: the official solves the equation by up to
    ``optim_niter = 20`` concave-convex iterations, each a cone program (cvxpy + ECOS), stopping
    on a residual of the *normalised* Gramian that rarely fires, so its weights are often not at
    the fixed point. Here the same fixed point is found exactly, by Newton's method on its convex
    potential (:mod:`~mtlkit.methods.alpha_fair`), warm-started from the previous step. Where no
    solution exists (a zero gradient; conflicting, linearly dependent gradients) the official
    silently keeps the previous weights; here zero-gradient tasks get weight 0 and the weights
    stay finite (the clipping bounds the step); the final relative residual of the equation is
    reported in ``StepInfo.extras['residual']``.
    """

    max_norm: float | None = hparam(
        1.0, number(gt=0) | none(), "clip the shared gradient's norm (official 1.0; None: no clipping)"
    )

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return self.fair_weights(gramian, 1.0)
