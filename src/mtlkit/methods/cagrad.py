"""CAGrad: conflict-averse gradient descent."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from mtlkit.core.engine import HeadGrad
from mtlkit.core.tasks import TaskSet
from mtlkit.methods.gradient_methods import GramianWeighting
from mtlkit.methods.hparams import boolean, hparam, none, number, one_of
from mtlkit.methods.min_norm import min_norm_weights
from mtlkit.methods.registry import register


def _face_minimiser(g: Tensor, b: Tensor, rho: float, w: Tensor) -> tuple[Tensor, float] | None:
    """The stationary point of ``b^T w + rho ||J^T w||`` on the affine hull of ``w``'s support,
    in closed form: ``w_S = (u / rho) G_SS^-1 (mu 1 - b_S)`` with ``mu`` and ``u`` from
    ``sum w_S = 1`` and ``||J^T w|| = u``; ``None`` when it does not exist or is not interior."""
    support = (w > 0).nonzero().squeeze(1)
    gs = g[support][:, support]
    rhs = torch.stack([torch.ones(len(support), dtype=torch.float64), b[support]], dim=1)
    sol, info = torch.linalg.solve_ex(gs, rhs)
    if int(info) != 0 or not bool(torch.isfinite(sol).all()):
        return None
    sol = sol + torch.linalg.solve(gs, rhs - gs @ sol)  # one refinement step
    a, cvec = sol[:, 0], sol[:, 1]
    big_a, big_c, big_b = float(a.sum()), float(cvec.sum()), float(b[support] @ cvec)
    disc = big_c * big_c - big_a * (big_b - rho * rho)
    if big_a <= 0 or disc <= 0:
        return None
    mu = (big_c + math.sqrt(disc)) / big_a
    u = rho / (mu * big_a - big_c)
    ws = (u / rho) * (mu * a - cvec)
    if not bool((ws > 0).all()) or not math.isfinite(u) or u <= 0:
        return None
    out = torch.zeros_like(w)
    out[support] = ws / ws.sum()
    u = math.sqrt(max(float(out @ g @ out), 0.0))
    if u <= 0:
        return None
    grad = (b + rho * (g @ out) / u)[support]  # equal on the support (fails for singular G_SS)
    if float(grad.max() - grad.min()) > 1e-9 * (
        float(grad.abs().max()) + rho * math.sqrt(float(g.diagonal().max()))
    ):
        return None
    return out, u


def _is_optimal(g: Tensor, b: Tensor, rho: float, w: Tensor, u: float) -> bool:
    """KKT of the dual on the simplex: every partial derivative at least the support's common one."""
    grad = b + rho * (g @ w) / u
    mu = float(w @ grad)
    tol = 1e-12 * max(float(g.diagonal().max()), 1e-300) / max(u, 1e-300) * rho + 1e-12 * abs(mu)
    return bool((grad >= mu - tol).all())


def ball_radius(gram: Tensor, c: float) -> float:
    """``rho = c ||g0||``, the radius of CAGrad's ball around the mean gradient ``g0``."""
    mean = torch.full((gram.shape[0],), 1.0 / gram.shape[0], dtype=gram.dtype, device=gram.device)
    return c * math.sqrt(max(float(mean @ gram @ mean), 0.0))


def cagrad_dual_weights(
    gram: Tensor, c: float, guess: float | None = None, init: Tensor | None = None
) -> tuple[Tensor, float]:
    """``w = argmin_{w in simplex} w^T G 1/K + rho sqrt(w^T G w)`` with ``rho = c ||g0||``, and
    ``u = ||J^T w||`` (float64, on the CPU).

    The dual is solved exactly through its fixed-point form: the minimiser also minimises the
    quadratic majoriser ``w^T G 1/K + rho w^T G w / (2 u)`` at its own ``u``, whose minimiser is the
    min-norm point of the shifted hull ``{g_k + t g0}`` with ``t = u / rho`` (the exact Wolfe
    solver of :mod:`~mtlkit.methods.min_norm` on the shifted Gramian). So ``u`` is the root of
    ``h(t) = ||J^T w(t)|| - rho t``, found by Brent's method to round-off; ``h(0) >= 0`` and
    ``h < 0`` beyond ``max_k ||g_k|| / rho``. If ``h`` is nowhere clearly positive (above ``1e-7``
    of the largest gradient norm, the precision of a norm taken from a Gramian) on a halving walk
    down from there, or ``u`` is below that, the minimiser is the point ``J^T w = 0`` of the hull:
    ``u = 0``.

    Fast path, tried first: on the support of ``w(t)`` the minimiser has a closed form
    (:func:`_face_minimiser`); majorise-minimise steps ``t <- ||J^T w(t)|| / rho`` from ``guess``
    (e.g. the previous step's ``u / rho``) until the closed form passes the KKT test usually take
    one to three min-norm solves; Brent's method is the fallback.
    """
    g = gram.detach().to("cpu", torch.float64)
    k = g.shape[0]
    ones = torch.full((k,), 1.0 / k, dtype=torch.float64)
    b = g @ ones  # <g_j, g0>
    g0_sq = float(ones @ b)
    rho = ball_radius(g, c)
    if k == 1:
        return torch.ones(1, dtype=torch.float64), math.sqrt(max(float(g[0, 0]), 0.0))
    if rho <= 0:
        return ones.clone(), math.sqrt(max(g0_sq, 0.0))
    state: dict[str, Tensor] = {}
    if init is not None and init.shape == (k,) and bool((init >= 0).all()) and float(init.sum()) > 0:
        state["w"] = init.detach().to("cpu", torch.float64)

    top = math.sqrt(max(float(g.diagonal().max()), 0.0))
    w, u = _solve_dual(g, b, g0_sq, rho, top, state, guess)
    # ||J^T w|| is known to about sqrt(eps) of the gradients' scale: below that it is 0.
    return w, (u if u > 1e-7 * top else 0.0)


def _solve_dual(
    g: Tensor, b: Tensor, g0_sq: float, rho: float, top: float, state: dict[str, Tensor], guess: float | None
) -> tuple[Tensor, float]:
    def weights_at(t: float) -> Tensor:
        shifted = g + t * (b[:, None] + b[None, :]) + t * t * g0_sq
        w = min_norm_weights(shifted, init=state.get("w"))
        state["w"] = w
        return w

    def h(t: float) -> float:
        w = weights_at(t)
        return math.sqrt(max(float(w @ g @ w), 0.0)) - rho * t

    hi = 2.0 * top / rho
    lo = 1e-12 * hi
    t = min(max(guess if guess is not None and guess > 0 else math.sqrt(g0_sq) / rho, lo), hi)
    for _ in range(12):
        w = weights_at(t)
        face = _face_minimiser(g, b, rho, w)
        if face is not None and _is_optimal(g, b, rho, *face):
            return face
        # A majorise-minimise step (monotone in the dual objective): the support settles fast.
        t = min(max(math.sqrt(max(float(w @ g @ w), 0.0)) / rho, lo), hi)
    # Bracket a root: h(hi) < 0; walk t down from hi until h is clearly positive. Next to t = 0,
    # h is ||J^T w|| of the min-norm point, known only to ~sqrt(eps) of the gradients' scale, so
    # its sign there is noise when 0 is in the hull; a root may still lie further out (c < 1).
    upper, lower = hi, None
    t = hi
    while t > lo:
        t *= 0.5
        if h(t) > 1e-7 * top:
            lower = t
            break
        upper = t
    if lower is None:  # no root with ||J^T w|| > 0: the minimiser is J^T w = 0
        w = state["w"]
        return w, math.sqrt(max(float(w @ g @ w), 0.0))
    from scipy.optimize import brentq  # the fallback only: importing it costs ~0.5 s at start-up

    t = brentq(h, lower, upper, xtol=1e-300, rtol=1e-15, maxiter=200)
    w = weights_at(t)
    return w, math.sqrt(max(float(w @ g @ w), 0.0))


@register("cagrad")
class CAGrad(GramianWeighting):
    """CAGrad: Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task
    Learning", NeurIPS 2021.

    The update maximises the worst task improvement ``min_k <g_k, d>`` within a ball around the
    mean gradient ``g0``: ``||d - g0|| <= c ||g0||``. Through the dual, with
    ``w = argmin_{simplex} <g0, J^T w> + c ||g0|| ||J^T w||``,
    ``d = g0 + c ||g0|| J^T w / ||J^T w||``, i.e. weights ``1/K + c ||g0|| w / ||J^T w||``.

    Official conventions (Cranial-XIX/CAGrad, and the nash-mtl code behind the published tables):
    ``c = 0.4`` (the official run scripts for NYUv2 and Cityscapes and nash-mtl's default; the
    argparse default is 0.5, LibMTL's 0.5), ``rescale=1`` divides by ``1 + c^2``, the result is
    multiplied by K "to match the sum loss" (``scale="num_tasks"``; LibMTL: 1; TorchJD: neither
    rescale nor K), heads get their own gradient, no clipping (``max_norm``: the fairgrad
    repository's baseline clips at 1.0).

    Departure: the official solves the dual with SciPy's SLSQP from ``1/K`` and never checks its
    convergence (an infeasible or inexact ``w`` goes into the update); here the dual is solved
    exactly (:func:`cagrad_dual_weights`), so the constraint ``||d - g0|| = c ||g0||`` is active to
    round-off. The official adds ``1e-8`` inside square roots and to ``||J^T w||``; where that
    matters (``J^T w = 0`` at the optimum, when 0 is in the hull of the gradients) its direction is
    round-off noise; here it is ``max(0, 1 - c) g0``, the primal maximiser ``0`` when ``c >= 1``
    (the only case where 0 can be in the interior of the hull at the optimum).
    """

    c: float = hparam(0.4, number(ge=0), "radius of the ball around the mean gradient, relative to its norm")
    rescale: Literal[0, 1, 2] = hparam(
        1, one_of(0, 1, 2), "0: none, 1: divide by 1 + c^2 (official), 2: by 1 + c"
    )
    scale: float | Literal["num_tasks"] = hparam(
        "num_tasks", number(gt=0) | one_of("num_tasks"), "overall factor (official K: 'num_tasks'; LibMTL 1)"
    )
    head_grad: HeadGrad = hparam("own", one_of("own", "weighted"), "heads get their own gradient (official)")
    max_norm: float | None = hparam(
        None, number(gt=0) | none(), "clip the shared gradient's norm (None: off)"
    )

    warm_start: bool = hparam(True, boolean(), "start the dual solver from the previous step's solution")
    previous: Tensor

    def _build(self, tasks: TaskSet) -> None:
        # the previous dual solution and, last, its t = ||J^T w|| / rho (the solver's warm start)
        self.register_buffer("previous", torch.zeros(len(tasks) + 1, dtype=torch.float64))

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        a = len(gramian)
        index = self.active_index
        rows = index.to(self.previous.device) if index is not None else None
        init, guess = None, None
        if self.warm_start and rows is not None and float(self.previous[-1]) > 0:
            init, guess = self.previous[rows], float(self.previous[-1])
        w, u = cagrad_dual_weights(gramian, float(self.c), guess=guess, init=init)
        g = gramian.detach().to("cpu", torch.float64)
        mean = torch.full((a,), 1.0 / a, dtype=torch.float64)
        rho = ball_radius(g, float(self.c))
        # J^T w = 0 at the optimum (0 is in the hull): the primal maximiser is g0 moved towards
        # 0 by the radius (d = 0 when c >= 1, optimal then); the official's 1e-8 gives noise.
        out = mean + (rho / u) * w if u > 0 else mean * max(0.0, 1.0 - float(self.c))
        if rows is not None:
            kept = torch.zeros_like(self.previous)
            kept[rows] = w.to(kept)
            kept[-1] = u / rho if rho > 0 and u > 0 else 0.0
            self.previous = kept
        self.report(worst_improvement=float((g @ out).min()))  # min_k <g_k, d>, before rescaling
        if self.rescale == 1:
            out = out / (1.0 + float(self.c) ** 2)
        elif self.rescale == 2:
            out = out / (1.0 + float(self.c))
        factor = float(len(self.previous) - 1) if self.scale == "num_tasks" else float(self.scale)
        return (out * factor).to(gramian.device)
