"""PMTL: Pareto multi-task learning in preference sub-regions (Lin et al., NeurIPS 2019)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mtlkit.core.preferences import simplex_lattice
from mtlkit.core.tasks import TaskSet
from mtlkit.errors import ConfigError
from mtlkit.methods.gradient_methods import GramianWeighting
from mtlkit.methods.hparams import hparam, none, number, numbers
from mtlkit.methods.min_norm import min_norm_weights
from mtlkit.methods.registry import register


def circle_references(count: int) -> Tensor:
    """PMTL's two-task reference vectors: ``(cos t, sin t)`` for ``count`` angles evenly spaced on
    ``[0, pi/2]``, unit norm, both axes included (the official ``circle_points``)."""
    angles = torch.linspace(0.0, math.pi / 2, count, dtype=torch.float64)
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def default_references(tasks: int) -> Tensor:
    """Five circle vectors for two tasks (the official setting); for more tasks, our extension: the
    simplex lattice with two divisions, scaled to unit norm."""
    if tasks == 2:
        return circle_references(5)
    lattice = simplex_lattice(tasks, 2, interior=False)
    return lattice / lattice.norm(dim=1, keepdim=True)


def active_constraints(references: Tensor, index: int, losses: Tensor) -> Tensor:
    """The rows ``u_j - u_k`` (``k = index``) whose constraint ``(u_j - u_k)^T L <= 0`` is violated
    (strictly), i.e. the loss vector is closer in angle to ``u_j`` than to ``u_k``."""
    diffs = references - references[index]
    direction = losses.to(torch.float64) / losses.to(torch.float64).norm().clamp_min(1e-300)
    return diffs[(diffs @ direction) > 0]


@register("pmtl")
class PMTL(GramianWeighting):
    """Pareto MTL: Lin, Zhen, Li, Zhang, Kwong, "Pareto Multi-Task Learning", NeurIPS 2019.

    The loss space is split by unit reference vectors ``u_1..u_K``; a run looks for a Pareto
    optimal point in the sub-region of ``u_k`` (``index = k``), where ``(u_j - u_k)^T L <= 0`` for
    all ``j``. One model is trained per reference vector (:mod:`mtlkit.pareto` does that), so a
    front of ``K`` points costs ``K`` runs.

    - **Initialisation** (at most ``init_epochs`` epochs, left at the first step whose losses are
      feasible): descend the violated constraints only, with weights ``lambda = W_I^T beta``, where
      ``beta`` is the min-norm point of the constraint gradients ``W_I J`` (``W_I`` the violated
      rows ``u_j - u_k``); not normalised, so a task may get a negative weight (an ascent).
    - **Main phase**: the min-norm point ``(gamma, beta)`` of the task gradients and the violated
      constraints' gradients together, ``lambda = gamma + W_I^T beta``, scaled so that
      ``sum |lambda_k|`` is the number of tasks (the official normalisation); with no violated
      constraint this is MGDA.

    Both min-norm problems are solved on the Gramian (``A G A^T`` for the stacked vectors ``A J``)
    by mtlkit's exact solver, where the official code uses Sener & Koltun's iterative solver, which
    clips the two-vector case to ``[0.001, 0.999]``. The Gramian is that of the shared parameters
    (the official code stacks all parameters, heads included). The reference vectors are the
    official five on the quarter circle for two tasks; for more tasks the default (two-division
    simplex lattice scaled to unit norm) is ours. A reference vector is a direction in LOSS space
    (a larger entry allows a larger loss), the opposite sense of the preferences of EPO, COSMOS and
    linear scalarisation; :mod:`mtlkit.pareto` converts a preference ``r`` to ``u ~ 1/r``.
    """

    references: list[list[float]] | None = hparam(
        None,
        numbers(numbers(number(ge=0))) | none(),
        "unit reference vectors u_1..u_K in loss space (default: 5 on the quarter circle for two tasks)",
    )
    index: int = hparam(0, number(ge=0, integer=True), "which reference vector's sub-region this run targets")
    init_epochs: int = hparam(
        2, number(ge=0, integer=True), "at most this many epochs of the feasibility search (official 2)"
    )
    reference_vectors: Tensor

    def _build(self, tasks: TaskSet) -> None:
        k = len(tasks)
        if self.references is None:
            refs = default_references(k)
        else:
            refs = torch.tensor([list(map(float, r)) for r in self.references], dtype=torch.float64)
            if refs.dim() != 2 or refs.shape[1] != k:
                raise ConfigError(f"PMTL references need {k} entries each, got shape {tuple(refs.shape)}.")
            norms = refs.norm(dim=1, keepdim=True)
            if not bool((norms > 0).all()):
                raise ConfigError("PMTL references must be non-zero vectors.")
            refs = refs / norms
        if self.index >= len(refs):
            raise ConfigError(f"PMTL index {self.index} is out of range for {len(refs)} reference vectors.")
        self.register_buffer("reference_vectors", refs)
        self._epochs_done = 0
        self._searching = self.init_epochs > 0

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        refs = self.reference_vectors
        if self.active_index is not None and len(self.active_index) < refs.shape[1]:
            refs = refs[:, self.active_index.to(refs.device)]  # a sub-problem of the labelled tasks
        refs = refs.to(gramian.device)
        rows = active_constraints(refs, self.index, losses.to(gramian.device))
        g = gramian.to(torch.float64)
        if self._searching and len(rows) == 0:
            self._searching = False  # feasible: the main phase from this step on
        if self._searching:
            beta = min_norm_weights(rows @ g @ rows.T) if len(rows) > 1 else g.new_ones(1)
            self.report(phase=torch.tensor(0), violated=torch.tensor(len(rows)))
            return rows.T @ beta
        stacked = torch.cat([torch.eye(len(g), dtype=g.dtype, device=g.device), rows])
        solution = min_norm_weights(stacked @ g @ stacked.T)
        lam = stacked.T @ solution
        total = lam.abs().sum()
        self.report(phase=torch.tensor(1), violated=torch.tensor(len(rows)))
        return lam * (len(lam) / total) if bool(total > 0) else lam

    def _epoch_end(self) -> None:
        self._epochs_done += 1
        if self._epochs_done >= self.init_epochs:
            self._searching = False

    def _extra_state(self) -> dict[str, Any]:
        return {"epochs_done": self._epochs_done, "searching": self._searching}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._epochs_done = int(state.get("epochs_done", 0))
        self._searching = bool(state.get("searching", self.init_epochs > 0))
