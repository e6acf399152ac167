"""UPGrad: the mean of the task gradients projected onto the dual cone (Quinton & Rey, 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlkit.core.engine import HeadGrad
from mtlkit.core.tasks import TaskSet
from mtlkit.errors import ConfigError
from mtlkit.methods.dual_cone import project_weights
from mtlkit.methods.gradient_methods import GramianWeighting
from mtlkit.methods.hparams import boolean, hparam, none, number, numbers
from mtlkit.methods.registry import register


@register("upgrad")
class UPGrad(GramianWeighting):
    """UPGrad: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv
    2406.16232, 2024 (the aggregator of TorchJD).

    ``d = sum_k p_k pi(g_k)``, where ``pi`` projects onto the dual cone ``{y : <g_j, y> >= 0 for
    all j}``: each task gradient is minimally changed so that it conflicts with no task, and the
    results are averaged with the preference ``p`` (default ``1/K``). In the Gramian form of the
    paper's Proposition 1, ``w = sum_k v^(k)`` with ``v^(k) = argmin_{v >= p_k e_k} v^T G v``, and
    ``d = J^T w``; so ``G w >= 0`` (no task's loss increases to first order) and ``w >= p``.

    Departures from TorchJD: the K quadratic programs are solved exactly by an active-set method
    (:mod:`~mtlkit.methods.dual_cone`: batched block principal pivoting in float64 torch on the
    Gramian's device, warm-started from the previous step's free sets), so no ``reg_eps * I`` is needed (TorchJD adds ``1e-4 I``
    to the trace-normalised Gramian for quadprog; ``reg_eps=1e-4`` reproduces it) and the result
    is non-conflicting to round-off; the Gramian is normalised by its largest diagonal entry,
    which cannot change the exact solution (TorchJD's absolute ``norm_eps`` threshold, which turns
    UPGrad into the plain mean once ``trace(G) < 1e-4``, is not used). Heads get their own
    gradient (TorchJD's multi-task backward). Works at both levels (``level="representation"``:
    the projection is done in the representation's gradient space).
    """

    head_grad: HeadGrad = hparam(
        "own", GramianWeighting._hparams["head_grad"].check, "heads get their own gradient"
    )
    pref: Sequence[float] | None = hparam(
        None, numbers(number(gt=0)) | none(), "preference p_k > 0 per task (default 1/K)"
    )
    reg_eps: float = hparam(0.0, number(ge=0), "ridge added to the normalised Gramian (TorchJD: 1e-4)")

    warm_start: bool = hparam(True, boolean(), "start the solver from the previous step's free sets")
    free_sets: Tensor

    def _build(self, tasks: TaskSet) -> None:
        if self.pref is not None and len(self.pref) != len(tasks):
            raise ConfigError(f"UPGrad got {len(self.pref)} preferences for {len(tasks)} tasks.")
        k = len(tasks)
        self.register_buffer("free_sets", torch.zeros(k, k, dtype=torch.bool))

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
        rows = index.to(self.free_sets.device)
        warm = self.free_sets[rows][:, rows] if self.warm_start and self.task_names is not None else None
        v, free = project_weights(g, torch.diag(p), free=warm)  # row k: v^(k), with v >= p_k e_k
        if self.task_names is not None:
            sets = self.free_sets.clone()
            sets[rows[:, None], rows[None, :]] = free.to(sets.device)
            self.free_sets = sets
        return v.sum(0)
