"""EPO: exact Pareto optimal search towards a preference (Mahapatra & Rajan, ICML 2020)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linprog
from torch import Tensor

from mtlkit.core.tasks import TaskSet
from mtlkit.methods.gradient_methods import GramianWeighting
from mtlkit.methods.hparams import hparam, number
from mtlkit.methods.preferences import HasPreference
from mtlkit.methods.registry import register


def non_uniformity(losses: Tensor, preference: Tensor) -> Tensor:
    """EPO's ``mu(l, r) = KL(l_hat || 1/m)`` with ``l_hat = r * l / sum(r * l)``: 0 exactly when
    ``r_1 l_1 = ... = r_m l_m`` (the loss vector on the preference's ray), positive otherwise. Entries
    with ``l_hat`` at or below machine epsilon are left out of the sum, as in the official code."""
    rl = preference.to(torch.float64) * losses.to(torch.float64)
    share = rl / rl.sum()
    m = len(share)
    kept = share > torch.finfo(torch.float64).eps
    terms = torch.where(kept, share * torch.log(m * share.clamp_min(1e-300)), torch.zeros_like(share))
    return terms.sum()


def epo_direction(
    gramian: Tensor, losses: Tensor, preference: Tensor, eps: float = 1e-4
) -> tuple[Tensor | None, bool, float]:
    """The simplex weights ``alpha`` of EPO's linear program, whether it was the descent mode, and
    the non-uniformity ``mu``.

    ``C = G`` (the task gradients' Gramian), ``a = r * (log(m l_hat) - mu)`` the adjustment,
    ``c_a = C a``. Balance mode (``mu > eps``): maximise ``alpha^T c_a`` subject to
    ``(C alpha)_j >= 0`` for the tasks of largest ``r_j l_j``, no bound on the other tasks with
    ``(c_a)_j > 0``, and ``(C alpha)_j >= (c_a)_j`` (a bounded ascent) for the rest; when no
    ``(c_a)_j`` is positive, ``C alpha >= 0`` for all. Descent mode (``mu <= eps``): maximise
    ``1^T C alpha`` subject to ``C alpha >= 0`` and ``alpha^T c_a >= min(0, max_j (c_a)_j)`` (the
    restricted descent of the official code). Returns ``None`` for ``alpha`` when the LP solver
    fails (the caller then falls back to the preference)."""
    c = gramian.detach().to(torch.float64).cpu().numpy()
    loss = losses.detach().to(torch.float64).cpu().numpy()
    r = preference.detach().to(torch.float64).cpu().numpy()
    m = len(loss)
    rl = r * loss
    share = rl / rl.sum()
    mu = float(non_uniformity(torch.from_numpy(loss), torch.from_numpy(r)))
    adjustment = r * (np.log(m * np.maximum(share, 1e-300)) - mu)
    ca = c @ adjustment
    descent = mu <= eps
    # linprog minimises and takes A_ub x <= b_ub: (C alpha)_j >= b_j becomes -C_j alpha <= -b_j
    if descent:
        objective = -c.sum(axis=0)
        rows = [-c, -ca[None, :]]
        bounds = [np.zeros(m), np.array([-min(0.0, float(ca.max()))])]
    else:
        objective = -ca
        lower = ca.copy()
        up = ca > 0
        if up.any():
            top = rl == rl.max()
            keep = ~up | top
            lower[top] = 0.0
        else:
            keep = np.ones(m, dtype=bool)
            lower[:] = 0.0
        rows, bounds = [-c[keep]], [-lower[keep]]
    result = linprog(
        objective,
        A_ub=np.vstack(rows),
        b_ub=np.concatenate(bounds),
        A_eq=np.ones((1, m)),
        b_eq=np.ones(1),
        bounds=[(0.0, None)] * m,
        method="highs",
    )
    if result.status != 0 or result.x is None:
        return None, descent, mu
    alpha = np.clip(result.x, 0.0, None)
    return torch.from_numpy(alpha / alpha.sum()), descent, mu


@register("epo")
class EPO(HasPreference, GramianWeighting):
    """Exact Pareto optimal search: Mahapatra & Rajan, "Multi-Task Learning with User Preferences:
    Gradient Descent with Controlled Ascent in Pareto Optimization", ICML 2020.

    For a preference ``r`` the method steers the losses to the point of the Pareto front where
    ``r_1 L_1 = ... = r_m L_m`` (so a larger ``r_k`` asks for a smaller ``L_k``), and then descends
    along the front. Each step solves the linear program of :func:`epo_direction` on the Gramian of
    the task gradients: while the losses are off the preference's ray (non-uniformity ``mu >
    eps``) it balances them, allowing a bounded ascent of the tasks that are ahead; once on it, it
    descends without leaving it. The shared update is ``J^T (m alpha)`` (the official scaling by
    the number of tasks); heads get the weighted gradient, as in the official weighted backward.
    When the LP solver fails, the step uses the preference itself (``m r``), as the official code
    does, and ``StepInfo.extras["fallback"]`` says so; ``extras`` also carry ``mu`` and whether the
    step was a descent step.

    ``set_preference(r)`` changes the preference between steps (Pareto hypernetworks draw one per
    step, :mod:`mtlkit.pareto`). The preference is normalised to sum to 1 (as in the Pareto
    hypernetworks' EPO); the official MultiMNIST script uses unit-norm rays, which scales the
    adjustment, and so the bound on the ascent, by up to ``sqrt(m)``. Departures: the LP is solved
    by SciPy's HiGHS rather than GLPK through cvxpy (the same LP); the Gramian is that of the shared
    parameters (or the representation, ``level="representation"``), where the official code also
    stacks each task's head gradient into its row. Needs positive losses (``mu`` takes their
    logarithm).
    """

    positive_losses = True
    eps: float = hparam(1e-4, number(gt=0), "non-uniformity below which the step descends (official 1e-4)")

    def _build(self, tasks: TaskSet) -> None:
        self._build_preference(len(tasks))

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        r = self.active_preference(self.active_index)
        alpha, descent, mu = epo_direction(gramian, losses, r, self.eps)
        fallback = alpha is None
        if alpha is None:
            alpha = r.detach().cpu()
        self.report(
            mu=torch.tensor(mu, dtype=torch.float64),
            descent=torch.tensor(descent),
            fallback=torch.tensor(fallback),
        )
        return (len(alpha) * alpha).to(gramian.device, torch.float64)
