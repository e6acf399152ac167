"""MTIF: multi-task influence functions (Tu, Liu, Ma, Tang, "MultiTask Influence Function", arXiv
2505.21438, 2025), instance-level and task-level, for hard and soft sharing.

A training point is one task's label on one sample, ``z_li``. Removing it changes the training
objective ``L = sum_l S_l / N_l + R`` (each task's mean loss); to first order the weights move by
``H^{-1} (g_li - n_li G_l) / (N_l - n_li)``, where ``g_li`` is the point's loss gradient, ``n_li``
its labelled entries (1 for a scalar target) and ``G_l`` task ``l``'s mean-loss gradient: the
*normalisation-aware* form, which counts the re-weighting of task ``l``'s mean (``G_l`` is not zero
in MTL: only the sum over tasks is stationary). The standard form ``H^{-1} g_li / N_l`` is
available too. With ``u_k = H^{-1} grad V_k`` (``V_k``: task ``k``'s mean validation loss), one
inverse-Hessian-vector product per target task serves every training point: each point then
costs one forward-mode product ``u_k . g_li``.

Sign convention: mtlkit reports the **helpfulness** ``h^k_li = V_k(w^{-li}) - V_k(w)``: positive
when removing the point raises task ``k``'s validation loss (the point helps ``k``), negative when
it is harmful. The paper's ``Delta^k_li = V_k(w) - V_k(w^{-li})`` is its negation
(:meth:`InfluenceScores.paper_delta`). Hard sharing needs the model's shared/task split only for
``exact_block``; soft sharing enters through the model's ``regularization_loss()`` (the coupling
penalty), which couples the task blocks in ``H``. Scores are computed with the model in eval
mode at the trained (ideally converged) weights; deep models need damping and are usually
restricted to their last layers (``parameters="last"``).

Where we depart from the paper: its inverse-Hessian approximation for deep models and exact
data-selection rule are not public; mtlkit offers every named solver of :mod:`.ihvp` and the
selection rule of :mod:`.data_selection`, each stated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.core.contract import shared_parameters, task_parameters, unwrap
from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError
from mtlkit.relatedness import ihvp
from mtlkit.relatedness.ekfac import EKFAC
from mtlkit.relatedness.objective import TrainingObjective, influence_parameters


@dataclass
class InfluenceScores:
    """Influence of every training point on every task's validation loss.

    Attributes:
        tasks: task names (sources and targets, in this order).
        products: ``[i, l, k] = u_k . grad s_li`` (N, K, K), 0 where sample ``i`` has no label
            for task ``l``.
        counts: labelled entries of sample ``i`` for task ``l`` (N, K).
        totals: each task's labelled training entries ``N_l`` (K,).
        solver, damping: how ``u_k = (H + damping I)^{-1} grad V_k`` was obtained.
        residual: for ``cg``, the largest relative residual of that solve (None otherwise).
    """

    tasks: list[str]
    products: Tensor
    counts: Tensor
    totals: Tensor
    solver: str
    damping: float
    residual: float | None = None

    def helpfulness(self, normalized: bool = True) -> Tensor:
        """``h[i, l, k]``: the predicted change of task ``k``'s validation loss when task ``l``'s
        label of sample ``i`` is removed (positive: the point helps ``k``); NaN where there is
        no such point. ``normalized`` uses the normalisation-aware form (module docstring)."""
        n = self.counts.to(self.products.dtype)[:, :, None]
        total = self.totals.to(self.products.dtype)[None, :, None]
        if normalized:
            value = (self.products - n * self.task_matrix()[None]) / (total - n)
        else:
            value = self.products / total
        return torch.where(n > 0, value, torch.full_like(value, float("nan")))

    def paper_delta(self, normalized: bool = True) -> Tensor:
        """The paper's ``Delta^k_li = V_k(w) - V_k(w^{-li})`` (= ``-helpfulness``)."""
        return -self.helpfulness(normalized)

    def task_matrix(self) -> Tensor:
        """Task-level helpfulness (K, K), row = source ``l``, column = target ``k``: the predicted
        rise of ``V_k`` when task ``l``'s loss is removed from training, ``u_k . G_l`` (the exact
        first-order effect of dropping the whole task; positive: ``l`` helps ``k``)."""
        return self.products.sum(0) / self.totals.to(self.products.dtype)[:, None]

    def predict_removal(self, keep: Mapping[str, Tensor]) -> Tensor:
        """Predicted change of every ``V_k`` (K,) when the points with ``keep[task][i] == False``
        are removed together (first order, normalisation-aware: a task's remaining points are
        re-weighted to its new mean)."""
        change = torch.zeros(len(self.tasks), dtype=self.products.dtype)
        per_task = self.task_matrix()
        for j, name in enumerate(self.tasks):
            if name not in keep:
                continue
            mask = keep[name].to(torch.bool)
            if mask.shape != (self.products.shape[0],):
                raise ConfigError(
                    f"keep[{name!r}] must be a bool tensor of shape ({self.products.shape[0]},)."
                )
            removed = (~mask) & (self.counts[:, j] > 0)
            n_removed = self.counts[removed, j].sum().to(self.products.dtype)
            remaining = self.totals[j].to(self.products.dtype) - n_removed
            if n_removed == 0:
                continue
            if remaining <= 0:
                change += per_task[j]
                continue
            change += (self.products[removed, j].sum(0) - n_removed * per_task[j]) / remaining
        return change

    def point_scores(self, targets: Sequence[str], normalized: bool = True) -> Tensor:
        """``s[i, l] = sum_{k in targets} h[i, l, k]`` (N, K): a point's summed helpfulness for
        the target tasks (NaN where there is no point)."""
        index = [self._index(t) for t in targets]
        if not index:
            raise ConfigError("Name at least one target task.")
        return self.helpfulness(normalized)[:, :, index].sum(2)

    def _index(self, name: str) -> int:
        if name not in self.tasks:
            raise ConfigError(f"Unknown task {name!r}; the tasks are {self.tasks}.")
        return self.tasks.index(name)


def _block_ranges(
    model: nn.Module, objective: TrainingObjective, params: Sequence[nn.Parameter]
) -> tuple[Tensor, list[Tensor]]:
    shared_ids = {id(p) for p in shared_parameters(model)}
    per_task = task_parameters(model)
    if per_task is None:
        raise ConfigError("exact_block needs the model's task_parameters() to find the task blocks.")
    where = {id(p): i for i, p in enumerate(params)}
    shared = [i for i, p in enumerate(params) if id(p) in shared_ids]
    tasks = [[where[id(p)] for p in ps if id(p) in where] for ps in per_task.values()]
    return ihvp.block_ranges(objective, shared, tasks)


def influence_scores(
    model: nn.Module,
    tasks: TaskSet | Sequence[Task],
    train: Iterable[Any],
    val: Iterable[Any],
    solver: str = "cg",
    parameters: str | Sequence[nn.Parameter] = "all",
    damping: float | None = None,
    weight_decay: float = 0.0,
    curvature: str = "hessian",
    seed: int = 0,
    **options: Any,
) -> InfluenceScores:
    """MTIF scores of every training point (sample, task) on every task's validation loss.

    Args:
        model: the trained multi-task model (scored in eval mode; its mode is restored).
        tasks: the task set.
        train: the training batches, re-iterable in a fixed order (a loader with ``shuffle=False``);
            a point's index is its sample's position in that order.
        val: held-out batches (not the test split) defining each ``V_k``.
        solver: ``exact``, ``exact_block``, ``cg``, ``lissa``, ``ekfac`` or ``identity``
            (:mod:`mtlkit.relatedness.ihvp`).
        parameters: ``"all"``, ``"last"`` (last shared layer + task-specific parameters) or a list.
        damping: added to the Hessian's diagonal; default 0 for the exact solvers, ``1e-3 trace(H)/P``
            for ``cg`` and ``lissa``, 0.1 x the mean corrected eigenvalue for ``ekfac``.
        weight_decay: the training objective's L2 term ``(weight_decay/2)||w||^2``, part of ``H``.
        curvature: ``"hessian"`` or ``"gauss_newton"`` (:mod:`mtlkit.relatedness.objective`; for
            non-convex networks, where the Hessian is indefinite and CG or LiSSA may fail).
            EK-FAC is a Gauss-Newton approximation whatever this says.
        seed: seeds the stochastic parts (Hutchinson probes, LiSSA batches, EK-FAC's sampled targets).
        options: the solver's own (``chunk``; ``max_iterations``, ``tolerance``; ``depth``,
            ``repeats``, ``scale``).
    """
    ihvp.check_solver(solver, options)
    damping = ihvp.finite_damping(damping)
    task_set = tasks if isinstance(tasks, TaskSet) else TaskSet(tasks)
    inner = unwrap(model)
    params = influence_parameters(inner, parameters)
    was_training = inner.training
    inner.eval()
    try:
        objective = TrainingObjective(inner, task_set, train, params, weight_decay, curvature)
        residual: float | None = None
        g_val = objective.task_gradients(val, "validation")
        if not bool(torch.isfinite(g_val).all()):
            raise ConfigError("The validation gradients are not finite; check the model and the data.")
        if solver in ("exact", "exact_block"):
            used = damping or 0.0
            if solver == "exact":
                u = ihvp.solve_dense(ihvp.hessian(objective, **options), g_val, used)
            else:
                shared, blocks = _block_ranges(inner, objective, params)
                u = ihvp.solve_exact_block(objective, g_val, shared, blocks, used, **options)
        elif solver == "cg":
            used = damping if damping is not None else ihvp.auto_damping(objective, seed=seed)
            u, residual = ihvp.solve_cg(objective, g_val, used, **options)
        elif solver == "lissa":
            used = damping if damping is not None else ihvp.auto_damping(objective, seed=seed)
            u = ihvp.solve_lissa(objective, g_val, used, seed=seed, **options)
        elif solver == "ekfac":
            factors = EKFAC(objective, params, seed=seed)
            used = damping if damping is not None else 0.1 * factors.mean_eigenvalue()
            u = factors.solve(g_val, used)
        else:
            used, u = 0.0, g_val
        products, counts = objective.point_products(u)
    finally:
        inner.train(was_training)
    cpu = torch.device("cpu")  # the scores are analysis results, whatever device the model is on
    return InfluenceScores(
        task_set.names,
        products.to(cpu),
        counts.to(cpu),
        objective.counts.to(cpu),
        solver,
        float(used),
        residual,
    )
