"""DualProj: the weighted mean of the task gradients projected onto their dual cone."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit.core.engine import HeadGrad
from mtlkit.core.tasks import TaskSet
from mtlkit.errors import ConfigError
from mtlkit.methods.dual_cone import project_weights
from mtlkit.methods.gradient_methods import GramianWeighting
from mtlkit.methods.hparams import boolean, hparam, none, number, numbers, one_of
from mtlkit.methods.registry import register


@register("dualproj")
class DualProj(GramianWeighting):
    """DualProj: the projection of Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual
    Learning", NeurIPS 2017 (eq. 11), used as a multi-task aggregator as in TorchJD (Quinton &
    Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232, 2024).

    ``d = pi(J^T p)``: the weighted mean of the task gradients (preference ``p``, default
    ``1/K``), minimally changed so that it conflicts with no task (``pi`` projects onto the dual
    cone ``{y : J y >= 0}``). In Gramian form ``w = argmin_{v >= p} v^T G v`` and ``d = J^T w``;
    the KKT conditions are ``w >= p``, ``G w >= 0`` and ``(w - p)_k (G w)_k = 0``.

    Departures from TorchJD as for :class:`~mtlkit.methods.upgrad.UPGrad`: the QP is solved
    exactly (batched block principal pivoting, :mod:`~mtlkit.methods.dual_cone`) with no
    ``1e-4 I`` ridge (``reg_eps=1e-4`` reproduces TorchJD's) and no absolute ``norm_eps``
    threshold on the trace. Heads get their own gradient. Works at both levels.
    """

    head_grad: HeadGrad = hparam("own", one_of("own", "weighted"), "heads get their own gradient")
    pref: Sequence[float] | None = hparam(
        None, numbers(number(gt=0)) | none(), "preference p_k > 0 per task (default 1/K)"
    )
    reg_eps: float = hparam(0.0, number(ge=0), "ridge added to the normalised Gramian (TorchJD: 1e-4)")
    warm_start: bool = hparam(True, boolean(), "start the solver from the previous step's free set")
    free_set: Tensor

    def _build(self, tasks: TaskSet) -> None:
        if self.pref is not None and len(self.pref) != len(tasks):
            raise ConfigError(f"DualProj got {len(self.pref)} preferences for {len(tasks)} tasks.")
        self.register_buffer("free_set", torch.zeros(len(tasks), dtype=torch.bool))

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        a = len(gramian)
        index = self.active_index if self.active_index is not None else torch.arange(a)
        if self.pref is None:
            p = torch.full((a,), 1.0 / a, dtype=torch.float64, device=gramian.device)
        else:
            p = torch.tensor(list(self.pref), dtype=torch.float64)[index.cpu()].to(gramian.device)
        g = gramian
        if self.reg_eps:
            g = g / g.trace().clamp_min(1e-300) + self.reg_eps * torch.eye(a, dtype=g.dtype, device=g.device)
        rows = index.to(self.free_set.device)
        warm = self.free_set[rows][None] if self.warm_start and self.task_names is not None else None
        v, free = project_weights(g, p[None], free=warm)
        if self.task_names is not None:
            kept = self.free_set.clone()
            kept[rows] = free[0].to(kept.device)
            self.free_set = kept
        return v[0]
