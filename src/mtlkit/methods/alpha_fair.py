"""The alpha-fair weights ``G w = w^(-1/alpha)``, shared by Nash-MTL (alpha = 1) and FairGrad.

With ``d = J^T w``, the condition says that task k's directional derivative ``<g_k, d>`` equals
``w_k^(-1/alpha)``: the alpha-fair allocation of Ban & Ji (ICML 2024), which for alpha = 1 is the
Nash bargaining solution ``w_k (G w)_k = 1`` of Navon et al. (ICML 2022).

The condition is the stationarity condition of the strictly convex potential

    f(w) = w^T G w / 2 - sum_k phi(w_k),   phi(w) = log w (alpha = 1),  w^(1-1/alpha) / (1-1/alpha),

on ``w > 0`` (``phi`` is concave and increasing, so ``-phi`` is a barrier that keeps ``w``
positive). It is minimised here by damped Newton steps (Hessian ``G + diag(w^(-1/alpha-1)/alpha)``,
positive definite) with a fraction-to-the-boundary rule and Armijo backtracking, then finished by
Newton's method on the dimensionless equation ``w_k^(1/alpha) (G w)_k = 1`` in log coordinates,
until every task's relative error is at round-off. This replaces the anchors' solvers: Nash-MTL's official code runs up to
20 concave-convex iterations, each a cone program solved by ECOS, and stops on a test on the
*normalised* Gramian that rarely fires; FairGrad's runs SciPy's ``least_squares`` on the residual
without checking convergence. All target the same fixed point; this one reaches it.

The fixed point need not exist: a task with a zero gradient can get no positive share, and
conflicting tasks whose gradients are linearly dependent (``g_2 = -g_1``) make ``f`` unbounded
below. Zero-gradient tasks are left out (weight 0), and the Newton iterations run first with a
ridge of ``1e-12`` of the largest diagonal entry, which keeps the potential bounded, then on the
exact Gramian from there (kept when it reaches the fixed point). So the weights stay finite in
every case (large where no solution exists; the optional norm clipping of Nash-MTL and FairGrad then bounds the
step).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit.core.tasks import TaskSet
from mtlkit.methods.gradient_methods import GramianWeighting
from mtlkit.methods.hparams import boolean, hparam

RIDGE = 1e-12


def _potential(g: Tensor, w: Tensor, alpha: float) -> Tensor:
    quad = 0.5 * w @ g @ w
    if alpha == 1.0:
        return quad - torch.log(w).sum()
    e = 1.0 - 1.0 / alpha
    return quad - (w.pow(e) / e).sum()


def _residual(g: Tensor, w: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    target = w.pow(-1.0 / alpha)
    return g @ w - target, target


def alpha_fair_weights(
    gram: Tensor,
    alpha: float,
    *,
    init: Tensor | None = None,
    tol: float = 1e-13,
    max_iter: int = 200,
) -> tuple[Tensor, float]:
    """``w > 0`` with ``G w = w^(-1/alpha)`` (zero-gradient tasks get 0), and the final relative
    residual ``max_k |w_k^(1/alpha) (G w)_k - 1|`` over the tasks with a gradient.

    ``init`` (e.g. the previous step's weights) warm-starts the Newton iterations; float64 on
    ``gram``'s device.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}.")
    g_all = gram.detach().to(torch.float64)
    k = g_all.shape[0]
    out = torch.zeros(k, dtype=torch.float64, device=g_all.device)
    diag = g_all.diagonal()
    scale = float(diag.max()) if k else 0.0
    if scale <= 0:
        return out, 0.0
    live = (diag > 1e-24 * scale).nonzero().squeeze(1)
    g = g_all[live][:, live] / scale
    # The solution for G is the one for G / s times s^(-alpha / (alpha + 1)).
    factor = scale ** (-alpha / (alpha + 1.0))
    w = g.diagonal().pow(-alpha / (alpha + 1.0))  # exact when the gradients are orthogonal
    if init is not None and init.shape == (k,):
        guess = init.detach().to(g.device, torch.float64)[live] / factor
        if bool((guess > 0).all()) and bool(torch.isfinite(guess).all()):
            w = guess
    # Solve with the ridge (always bounded), then polish on the exact Gramian: where the fixed
    # point exists Newton converges quadratically from there; where it does not, keep the first.
    eye = torch.eye(len(live), dtype=torch.float64, device=g.device)
    w = _newton(g + RIDGE * eye, w, alpha, tol, max_iter)
    rel = _componentwise(g, w, alpha)
    exact, exact_rel = _finish(g, w, rel, alpha, tol, 50)
    if exact_rel < rel:
        w, rel = exact, exact_rel
    out[live] = w * factor
    return out, rel


def _componentwise(g: Tensor, w: Tensor, alpha: float) -> float:
    """``max_k |w_k^(1/alpha) (G w)_k - 1|``: the equation's relative error, task by task."""
    return float((w.pow(1.0 / alpha) * (g @ w) - 1).abs().max())


def _finish(
    g: Tensor, w: Tensor, rel: float, alpha: float, tol: float, max_iter: int
) -> tuple[Tensor, float]:
    """Newton's method on ``F_k(u) = w_k^(1/alpha) (G w)_k - 1 = 0`` in ``u = log w``: the
    dimensionless form converges quadratically where the potential's Newton steps stall on
    weights that span many orders of magnitude."""
    u = torch.log(w)
    best = rel  # the componentwise error at w
    for _ in range(max_iter):
        if best <= tol:
            break
        w = torch.exp(u)
        gw = g @ w
        f = w.pow(1.0 / alpha) * gw - 1
        jac = w.pow(1.0 / alpha)[:, None] * (torch.diag(gw / alpha) + g * w[None, :])
        delta, info = torch.linalg.solve_ex(jac, -f)
        if int(info) != 0 or not bool(torch.isfinite(delta).all()):
            break
        delta = delta.clamp(-5.0, 5.0)
        t, improved = 1.0, False
        for _ in range(30):
            trial = _componentwise(g, torch.exp(u + t * delta), alpha)
            if trial < best:
                u, best, improved = u + t * delta, trial, True
                break
            t *= 0.5
        if not improved:
            break
    return torch.exp(u), best


def _newton(g: Tensor, w: Tensor, alpha: float, tol: float, max_iter: int) -> Tensor:
    """Damped Newton on the convex potential (globally convergent)."""
    value = _potential(g, w, alpha)
    for _ in range(max_iter):
        grad, target = _residual(g, w, alpha)
        if float(grad.norm()) <= tol * float(target.norm()) or not bool(torch.isfinite(grad).all()):
            break
        hess = g + torch.diag(w.pow(-1.0 / alpha - 1.0) / alpha)
        solved, info = torch.linalg.solve_ex(hess, grad)
        if int(info) != 0 or not bool(torch.isfinite(solved).all()):
            break
        step = -solved
        shrink = step < 0
        t = 1.0
        if bool(shrink.any()):
            t = min(1.0, 0.99 * float((-w[shrink] / step[shrink]).min()))
        slope = float(grad @ step)
        accepted = False
        for _ in range(60):
            trial = w + t * step
            new_value = _potential(g, trial, alpha)
            if bool(torch.isfinite(new_value)) and float(new_value) <= float(value) + 1e-4 * t * slope:
                accepted = True
                break
            t *= 0.5
        if not accepted:
            # The potential's decrease is below its round-off near the optimum: finish on the
            # residual instead (Newton's local quadratic convergence).
            trial = (
                w
                + min(1.0, 0.99 * float((-w[shrink] / step[shrink]).min()) if bool(shrink.any()) else 1.0)
                * step
            )
            if float(_residual(g, trial, alpha)[0].norm()) >= float(grad.norm()):
                break
            new_value = _potential(g, trial, alpha)
        w, value = trial, new_value
    return w


class AlphaFairWeighting(GramianWeighting):
    """The shared part of Nash-MTL and FairGrad: the alpha-fair weights of the active tasks,
    warm-started from the previous step's (``previous``, part of the state), with the equation's
    final relative residual in ``StepInfo.extras['residual']``."""

    warm_start: bool = hparam(True, boolean(), "start Newton's method from the previous weights")
    previous: Tensor

    def _build(self, tasks: TaskSet) -> None:
        self.register_buffer("previous", torch.zeros(len(tasks), dtype=torch.float64))

    def fair_weights(self, gramian: Tensor, alpha: float) -> Tensor:
        index = self.active_index
        rows = index.to(self.previous.device) if index is not None else None
        init = self.previous[rows] if self.warm_start and rows is not None else None
        w, residual = alpha_fair_weights(gramian, alpha, init=init)
        self.report(residual=residual)
        if rows is not None:
            kept = self.previous.clone()
            kept[rows] = w.to(kept.device)
            self.previous = kept
        return w
