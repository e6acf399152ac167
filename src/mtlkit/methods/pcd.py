"""PCD: priority-constrained descent (Varam & AlHajri, TMLR 2026), exact from the Gramian.

The quadratic program of PCD (the paper's Def. 4.1), for the normalised gradients ``h_i = s_i g_i``
with the primary objective first,

    d~ = argmin_d ||d - h_1||^2 / 2   s.t.   <h_j, d> >= tau_j ||h_j||^2   (j = 2..K),

is solved through its dual in the Gramian form: by the KKT conditions (Thm. 4.2)
``d~ = h_1 + sum_j mu_j h_j`` with ``mu >= 0``, and with ``S = N[1:, 1:]`` (``N`` the Gramian of
the ``h``) and ``b_j = tau_j N_jj - N_j1`` the conditions read

    s = S mu - b >= 0,   mu >= 0,   mu_j s_j = 0     (s_j: the slack of constraint j).

:func:`pcd_multipliers` is the dual active-set method of Goldfarb & Idnani ("A numerically stable
dual method for solving strictly convex quadratic programs", Mathematical Programming 27, 1983)
for an identity Hessian, run on ``S`` alone: it starts from ``d = h_1``, adds the most violated
constraint and drops the active ones whose multiplier reaches zero on the way; it ends, after
finitely many steps, with the exact active set, on which the multipliers are then re-solved in one
linear solve. A violated constraint whose gradient is (to ``DEPENDENCE_TOL``) a combination of the
active ones and no active multiplier can absorb it proves the constraints incompatible (two
anti-parallel secondaries; the paper's Cor. B.3): the paper's Algorithm 1 then drops every
constraint for the step and follows the primary gradient.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mtlkit.core.engine import HeadGrad
from mtlkit.core.tasks import TaskSet
from mtlkit.errors import ConfigError, LifecycleError
from mtlkit.methods.gradient_methods import GramianWeighting
from mtlkit.methods.hparams import Check, hparam, instance_of, none, number, numbers, one_of
from mtlkit.methods.registry import register

#: A constraint counts as satisfied when its slack is above ``-SLACK_TOL`` times the size of its
#: terms (``||h_j|| (||h_1|| + sum_k mu_k ||h_k||) + tau_j ||h_j||^2``): relative per constraint,
#: so a secondary with a small normalised gradient keeps its guarantee.
SLACK_TOL = 1e-11
#: A gradient whose component orthogonal to the active constraints' gradients has a squared norm
#: below this fraction of its own counts as their linear combination (the official code's and
#: TorchJD's 1e-9: sin^2 of the angle to their span), plus the rounding error of that squared norm
#: computed from the Gramian, which grows with the active set's conditioning (without it, a
#: dependent gradient of an ill-conditioned active set can pass for independent and turn
#: incompatible constraints into a "solution" with multipliers of 1e15).
DEPENDENCE_TOL = 1e-9
#: ``d~`` counts as zero when ``||d~||^2`` is below this fraction of ``(sum_i |w_i| ||h_i||)^2``: the
#: cancellation is then at the rounding level of a Gramian accumulated from float32 products (the
#: engine's default), and rescaling it to ``||g_1||`` would amplify noise.
ZERO_DIRECTION_TOL = 1e-12


@dataclass(frozen=True)
class PCDSolution:
    """The multipliers of one PCD problem.

    Attributes:
        mu: (K-1,) float64 multipliers ``>= 0`` of the secondaries' constraints (all zero when the
            constraints are incompatible).
        active: indices (into the secondaries) of the binding constraints.
        feasible: ``False`` when no direction satisfies every constraint.
        converged: ``False`` only if the iteration cap was reached (a warning is issued).
    """

    mu: Tensor
    active: tuple[int, ...]
    feasible: bool
    converged: bool = True


def pcd_multipliers(
    gram: Tensor,
    tau: Tensor | Sequence[float] | float,
    *,
    max_iter: int | None = None,
) -> PCDSolution:
    """Exact multipliers of the PCD problem for the K x K Gramian ``gram`` of the (normalised)
    gradients, primary first: ``d~ = h_1 + sum_j mu_j h_{j+1}`` (dual active set, module docstring).

    ``tau``: one value in [0, 1] or one per secondary. Solved in float64 on the CPU (the
    data-dependent pivoting of a K x K problem costs less there than hundreds of kernel launches);
    ``mu`` is returned on ``gram``'s device. ``max_iter`` (default ``50 K + 100``, far above the
    about K steps the method takes) only guards against cycling in rounding-level degeneracies:
    reaching it warns and returns the current multipliers, flagged ``converged=False``.
    """
    device = gram.device
    n = gram.detach().to("cpu", torch.float64)
    k = n.shape[0]
    if n.ndim != 2 or n.shape[1] != k or k == 0:
        raise ValueError(f"pcd_multipliers needs a non-empty square Gramian, got shape {tuple(gram.shape)}.")
    if k == 1:
        return PCDSolution(torch.zeros(0, dtype=torch.float64, device=device), (), True)
    taus = _taus(tau, k)
    s_mat = n[1:, 1:]
    b = taus * s_mat.diagonal() - n[1:, 0]
    mu, active, feasible, converged = _dual_active_set(
        s_mat, b, float(n[0, 0].clamp_min(0).sqrt()), taus, 50 * k + 100 if max_iter is None else max_iter
    )
    return PCDSolution(mu.to(device), tuple(active), feasible, converged)


def _dual_active_set(
    s_mat: Tensor, b: Tensor, primary_norm: float, taus: Tensor, max_iter: int
) -> tuple[Tensor, list[int], bool, bool]:
    m = len(b)
    diag = s_mat.diagonal().clamp_min(0)
    norms = diag.sqrt()
    mu = torch.zeros(m, dtype=torch.float64)
    active: list[int] = []
    steps = 0
    while True:
        slack = s_mat @ mu - b
        size = norms * (primary_norm + float(mu @ norms)) + taus * diag
        relative = slack / (norms * (primary_norm + float(mu @ norms))).clamp_min(1e-300)
        violated = (slack < -SLACK_TOL * size) & (diag > 0)
        if active:
            violated[active] = False  # tight by construction (their slack is rounding)
        if not bool(violated.any()):
            return mu.clamp_min(0), active, True, True
        # the most violated constraint (distance of d~ to its half-space, relative to ||d~||'s bound)
        p = int(torch.where(violated, relative, math.inf).argmin())
        slack_p = float(slack[p])
        while True:
            steps += 1
            if steps > max_iter:
                warnings.warn(
                    f"PCD's active-set solver stopped after {max_iter} steps without converging; the "
                    "step uses the current multipliers (StepInfo.extras['converged'] is False).",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return mu.clamp_min(0), active, True, False
            # Adding p: mu_p grows by t and the active multipliers move by -t r, which keeps the
            # active constraints tight; the primal direction moves along z = h_p - sum_A r_j h_j,
            # the component of h_p orthogonal to the active gradients.
            if active:
                block_mat = s_mat[active][:, active]
                cross = s_mat[active, p]
                r = _solve(block_mat, cross, norms[active])
                # ||h_p - sum_A r_j h_j||^2 as a quadratic form: first-order insensitive to the
                # error in r; its rounding error grows with |r| when the active set is ill-conditioned
                z2 = float(s_mat[p, p] - 2 * cross @ r + r @ block_mat @ r)
                rounding = 1e-14 * float(
                    s_mat[p, p] + 2 * cross.abs() @ r.abs() + r.abs() @ block_mat.abs() @ r.abs()
                )
                positive = r > 0
                ratios = torch.where(positive, mu[active] / torch.where(positive, r, 1.0), math.inf)
                block = int(ratios.argmin())
                partial = float(ratios[block])
            else:
                r = torch.zeros(0, dtype=torch.float64)
                z2, block, partial, rounding = float(s_mat[p, p]), -1, math.inf, 0.0
            # (a slack that rounding pushed to >= 0 gives a zero step: p enters, tight)
            full = max(-slack_p, 0.0) / z2 if z2 > DEPENDENCE_TOL * float(diag[p]) + rounding else math.inf
            step = min(full, partial)
            if step == math.inf:  # h_p is a combination of the active gradients with mu >= 0 fixed
                return torch.zeros(m, dtype=torch.float64), [], False, True
            if active:
                mu[active] = mu[active] - step * r
            mu[p] += step
            if full <= partial:
                active.append(p)
                # re-solve on the new active set: exact, and free of the steps' accumulated rounding
                exact = _solve(s_mat[active][:, active], b[active], norms[active])
                if bool((exact >= 0).all()):
                    mu.zero_()
                    mu[active] = exact
                break
            mu[active[block]] = 0.0  # its multiplier reached zero: drop it and try p again
            del active[block]
            slack_p = float(s_mat[p] @ mu - b[p])


def _taus(tau: Tensor | Sequence[float] | float, k: int) -> Tensor:
    taus = torch.as_tensor(tau, dtype=torch.float64).detach().cpu().reshape(-1)
    if taus.numel() == 1:
        return taus.expand(k - 1)
    if taus.numel() != k - 1:
        raise ValueError(f"PCD needs one tau or one per secondary ({k - 1}); got {taus.numel()}.")
    return taus


def _solve(a: Tensor, rhs: Tensor, norms: Tensor) -> Tensor:
    """``a^{-1} rhs`` for a Gramian block of linearly independent gradients, equilibrated by their
    norms (a correlation matrix; the dependence test bounds its conditioning)."""
    scaled = a / (norms[:, None] * norms[None, :])
    sol, info = torch.linalg.solve_ex(scaled, rhs / norms)
    if int(info) != 0 or not bool(torch.isfinite(sol).all()):
        sol = torch.linalg.pinv(scaled, hermitian=True) @ (rhs / norms)
    return sol / norms


def kkt_residual(gram: Tensor, tau: Tensor | Sequence[float] | float, mu: Tensor) -> float:
    """The largest relative violation of PCD's KKT conditions (primal feasibility, complementary
    slackness and ``mu >= 0``) for multipliers ``mu`` on the Gramian ``gram`` (primary first).

    Constraint j is measured against ``||h_j|| (||h_1|| + ||d~|| + 1e-13 B) + tau_j ||h_j||^2``,
    ``B = ||h_1|| + sum_k |mu_k| ||h_k||`` (the floor is the rounding level of a slack computed from
    the Gramian); a multiplier's complementarity is weighed by the share ``mu_j ||h_j|| / B``."""
    n = gram.detach().to("cpu", torch.float64)
    k = n.shape[0]
    if k == 1:
        return 0.0
    m = mu.detach().to("cpu", torch.float64)
    taus = _taus(tau, k)
    s_mat = n[1:, 1:]
    diag = s_mat.diagonal().clamp_min(0)
    norms = diag.sqrt()
    slack = s_mat @ m - (taus * diag - n[1:, 0])
    primary_norm = float(n[0, 0].clamp_min(0).sqrt())
    bound = max(primary_norm + float(m.abs() @ norms), 1e-300)
    combo = torch.cat([torch.ones(1, dtype=torch.float64), m])
    d_norm = math.sqrt(max(float(combo @ n @ combo), 0.0))
    size = (norms * (primary_norm + d_norm + 1e-13 * bound) + taus * diag).clamp_min(1e-300)
    primal = (-slack).clamp_min(0) / size
    complementary = m.clamp_min(0) * norms / bound * slack.abs() / size
    sign = (-m).clamp_min(0)
    return float(torch.cat([primal, complementary, sign]).max())


def pcd_weights(
    gram: Tensor, tau: Tensor | Sequence[float] | float, scales: Tensor
) -> tuple[Tensor, PCDSolution]:
    """PCD's weights on the raw gradients (``d = J^T w``, primary first) for the Gramian ``gram``
    of the raw gradients and the per-objective ``scales`` ``s_i``: ``d~`` of the problem on the
    normalised gradients ``s_i g_i``, rescaled to the norm of ``g_1`` (the paper's Algorithm 1).

    Zero when ``g_1 = 0`` or ``d~ = 0`` (to ``ZERO_DIRECTION_TOL``); ``e_1`` (``d = g_1``) when no
    constraint binds or the constraints are incompatible. Returns the weights (float64, on
    ``gram``'s device) and the solution of the normalised problem.
    """
    device = gram.device
    g = gram.detach().to("cpu", torch.float64)
    k = g.shape[0]
    s = scales.detach().to("cpu", torch.float64)
    w = torch.zeros(k, dtype=torch.float64)
    if float(g[0, 0]) <= 0:  # the primary is stationary: no step (Sec. 4.7 of the paper)
        empty = PCDSolution(torch.zeros(max(k - 1, 0), dtype=torch.float64), (), True)
        return w.to(device), empty
    normalized = g * (s[:, None] * s[None, :])
    sol = pcd_multipliers(normalized, tau)
    mu = sol.mu.to("cpu")
    if not bool((mu > 0).any()):  # d~ = h_1: the update is g_1 itself
        w[0] = 1.0
        return w.to(device), sol
    combo = torch.cat([torch.ones(1, dtype=torch.float64), mu])
    sq = float(combo @ normalized @ combo)
    magnitude = float(combo.abs() @ normalized.diagonal().clamp_min(0).sqrt()) ** 2
    if sq > ZERO_DIRECTION_TOL * magnitude:
        w = combo * s * math.sqrt(float(g[0, 0]) / sq)
    return w.to(device), sol


def _below_one(v: Any) -> bool:
    return number(ge=0)(v) and v < 1


@register("pcd")
class PCD(GramianWeighting):
    """PCD: Varam & AlHajri, "Not All Objectives Are Born Equal: Priority-Constrained Descent for
    Hierarchical Multi-Objective Optimization", Transactions on Machine Learning Research (TMLR),
    2026 (arXiv 2606.29521; official code github.com/DaraVaram/priority-constrained-descent;
    TorchJD 0.18 ``PCD`` / ``PCDWeighting``).

    One task is the primary objective (``primary``, default the first task), the others only
    constrain it. Each step, with the normalised gradients ``h_i = s_i g_i``, ``s_i = 1 /
    sqrt(v_i + eps)`` and ``v_i`` the bias-corrected EMA (decay ``beta``) of ``||g_i||^2``, PCD
    takes the direction closest to the primary's that gives every secondary at least a fraction
    ``tau_j`` of the first-order progress of a step along its own normalised gradient::

        d~ = argmin_d ||d - h_1||^2 / 2   s.t.   <h_j, d> >= tau_j ||h_j||^2,

    and ``d = d~ ||g_1|| / ||d~||``: ``w = [1, mu] * s * ||g_1|| / ||d~||`` with the KKT
    multipliers ``mu >= 0`` (Thm. 4.2), solved exactly from the Gramian (module docstring). It is
    ``g_1`` itself when ``g_1`` already satisfies every constraint, zero when ``g_1 = 0`` or ``d~ =
    0``, and ``g_1`` when the constraints are incompatible (Algorithm 1; ``extras['feasible']``).
    Not symmetric in the tasks: a loss-scale-free trade-off, with no loss weights.

    Defaults (official ``PCD`` class, README and experiments; TorchJD's are the same): ``tau`` 0.02
    (the paper's representative operating point; one value for every secondary, or one per
    secondary as a list in task order or a ``{task: tau}`` map), ``beta`` 0.999, ``eps`` 1e-8
    inside the square root (the paper's form; the research code used ``1/(sqrt(v) + eps)``).
    ``eps`` is absolute: for gradients with ``||g||^2`` well below it the normalisation fades
    towards ``s = eps^-1/2`` for all tasks, as in the official code. Heads get the weighted
    gradient: the official code writes one combination, rescaled, into every parameter;
    TorchJD's multi-task backward gives them their own (``head_grad="own"``).

    Departures: the official code enumerates the 2^(K-1) working sets; TorchJD runs the same dual
    active-set method with a slack tolerance of 1e-9 times the largest normalised squared norm (a
    secondary whose normalised gradient is tiny next to the others', ``tau ||h_j||^2`` below that,
    loses its guarantee), multipliers accumulated over the steps, and a cap of 10 K steps that
    silently returns the current iterate. Here the tolerance is relative per constraint, the
    dependence test allows for the rounding of the Gramian-only computation, the multipliers are
    re-solved on each new active set, and the cap (50 K + 100) warns and sets
    ``extras['converged']`` to False; ``d~ = 0`` is decided at 1e-12 of the squared magnitude
    (TorchJD: 10 epsilons of the Gramian's dtype, 2e-15 for float64, although the engine's default
    Gramian is accumulated from float32 products). A task without a labelled sample takes no part
    in the step and its EMA is not updated; each task counts its own EMA steps for the bias
    correction (TorchJD keeps one counter and resets the EMA when the number of tasks changes; the
    official code refuses it). A step whose primary has no labelled sample is a zero shared update
    (``g_1 = 0``); the other tasks' EMAs are updated. With ``update_every > 1`` the EMA sees the
    solving steps only. ``StepInfo.extras``: ``feasible``, ``converged``, ``active_constraints``
    and ``kkt_residual`` of the step's problem.
    """

    head_grad: HeadGrad = hparam(
        "weighted",
        one_of("own", "weighted"),
        "heads get the weighted gradient (official: one rescaled combination) or their own (TorchJD)",
    )
    tau: float | Sequence[float] | Mapping[str, float] = hparam(
        0.02,
        number(ge=0, le=1) | numbers(number(ge=0, le=1), keyed=True),
        "fraction of normalised progress guaranteed to each secondary (official 0.02): one value, a "
        "list with one per secondary in task order, or a {task: tau} map naming every secondary",
    )
    primary: str | None = hparam(
        None, instance_of(str) | none(), "the primary task's name (default: the first task)"
    )
    beta: float = hparam(
        0.999, Check(_below_one, "a number >= 0 and < 1"), "EMA decay of ||g_i||^2 (official 0.999)"
    )
    eps: float = hparam(1e-8, number(ge=0), "added to the EMA inside the square root (official 1e-8)")
    sq_norm_ema: Tensor
    ema_steps: Tensor

    def _build(self, tasks: TaskSet) -> None:
        names = tasks.names
        k = len(names)
        if self.primary is not None and self.primary not in names:
            raise ConfigError(f"PCD: primary must be one of the tasks {names}; got {self.primary!r}.")
        self._primary = names.index(self.primary) if self.primary is not None else 0
        secondaries = [n for i, n in enumerate(names) if i != self._primary]
        taus: list[float]
        if isinstance(self.tau, Mapping):
            given = set(self.tau)
            if given != set(secondaries):
                raise ConfigError(
                    f"PCD: a tau map must name every secondary task {secondaries} and nothing else; "
                    f"got {sorted(given)}."
                )
            taus = [float(self.tau[n]) for n in secondaries]
        elif isinstance(self.tau, Sequence):
            if len(self.tau) != k - 1:
                raise ConfigError(
                    f"PCD got {len(self.tau)} tau values for {k - 1} secondary task(s) {secondaries}."
                )
            taus = [float(t) for t in self.tau]
        else:
            taus = [float(self.tau)] * (k - 1)
        self._taus = [*taus[: self._primary], 0.0, *taus[self._primary :]]  # per task; primary unused
        self.register_buffer("sq_norm_ema", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("ema_steps", torch.zeros(k, dtype=torch.int64))
        self._extras: dict[str, Any] = {}

    def _scales(self, index: Tensor, sq_norms: Tensor) -> Tensor:
        """Update the active tasks' EMAs with this step's ``||g_i||^2``; their scales ``s_i``."""
        rows = index.to(self.sq_norm_ema.device)
        ema = self.beta * self.sq_norm_ema[rows].to(torch.float64) + (1.0 - self.beta) * sq_norms.to(
            self.sq_norm_ema.device
        )
        steps = self.ema_steps[rows] + 1
        self.sq_norm_ema.index_copy_(0, rows, ema.to(self.sq_norm_ema.dtype))
        self.ema_steps.index_copy_(0, rows, steps)
        debiased = ema / (1.0 - self.beta ** steps.to(torch.float64))
        denominator = (debiased + self.eps).sqrt()
        # an EMA that is 0 (with eps = 0) means the gradient was always 0: its scale does not matter
        return torch.where(denominator > 0, 1.0 / denominator, 0.0).to("cpu")

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        if self.task_names is None:
            raise LifecycleError("PCD.weights() needs the tasks: call method.setup(tasks) first.")
        a = len(gramian)
        index = self.active_index if self.active_index is not None else torch.arange(a)
        index = index.cpu()
        g = gramian.detach().to("cpu", torch.float64)
        scales = self._scales(index, g.diagonal().clamp_min(0))
        w = torch.zeros(a, dtype=torch.float64)
        here = (index == self._primary).nonzero().squeeze(1)
        if len(here) == 0:  # the primary has no labelled sample: g_1 = 0, no shared step
            self._extras = {"feasible": True, "converged": True, "active_constraints": 0, "kkt_residual": 0.0}
            return w.to(gramian.device)
        q = int(here[0])
        order = torch.tensor([q] + [i for i in range(a) if i != q])  # primary first
        taus = torch.tensor([self._taus[int(index[i])] for i in order[1:]], dtype=torch.float64)
        sub = g[order][:, order]
        w_ordered, sol = pcd_weights(sub, taus, scales[order])
        w[order] = w_ordered
        normalized = sub * (scales[order][:, None] * scales[order][None, :])
        self._extras = {
            "feasible": sol.feasible,
            "converged": sol.converged,
            "active_constraints": len(sol.active),
            "kkt_residual": kkt_residual(normalized, taus, sol.mu) if sol.feasible else 0.0,
        }
        return w.to(gramian.device)

    def step_extras(self) -> dict[str, Any]:
        return dict(getattr(self, "_extras", {}))
