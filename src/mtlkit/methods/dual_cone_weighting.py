"""The shared part of UPGrad and DualProj: a preference over the tasks, projections onto the dual
cone solved exactly (:mod:`~mtlkit.methods.dual_cone`), warm-started from the previous step."""

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


class DualConeWeighting(GramianWeighting):
    """Weights from projections ``argmin_{v >= b} v^T G v`` of preference-weighted combinations.

    Subclasses say how many projections they solve (``projections(k)``: K for UPGrad, one for
    DualProj) and combine them in :meth:`weights` through :meth:`project`. The free sets of the
    last solve are kept (``free_sets``, part of the state) and start the next one.
    """

    head_grad: HeadGrad = hparam("own", one_of("own", "weighted"), "heads get their own gradient")
    pref: Sequence[float] | None = hparam(
        None, numbers(number(gt=0)) | none(), "preference p_k > 0 per task (default 1/K)"
    )
    reg_eps: float = hparam(0.0, number(ge=0), "ridge added to the normalised Gramian (TorchJD: 1e-4)")
    warm_start: bool = hparam(True, boolean(), "start the solver from the previous step's free sets")
    free_sets: Tensor

    @staticmethod
    def projections(k: int) -> int:
        raise NotImplementedError

    def _build(self, tasks: TaskSet) -> None:
        if self.pref is not None and len(self.pref) != len(tasks):
            raise ConfigError(
                f"{type(self).__name__} got {len(self.pref)} preferences for {len(tasks)} tasks."
            )
        k = len(tasks)
        self.register_buffer("free_sets", torch.zeros(self.projections(k), k, dtype=torch.bool))

    def preference(self, gramian: Tensor) -> Tensor:
        """``p`` over the active tasks (``1/A`` by default), on the Gramian's device."""
        a = len(gramian)
        if self.pref is None:
            return torch.full((a,), 1.0 / a, dtype=torch.float64, device=gramian.device)
        index = self.active_index if self.active_index is not None else torch.arange(a)
        return torch.tensor(list(self.pref), dtype=torch.float64)[index.cpu()].to(gramian.device)

    def project(self, gramian: Tensor, lower: Tensor, rows: Tensor) -> Tensor:
        """``argmin_{v >= b} v^T G v`` for every row ``b`` of ``lower``; ``rows`` are the rows of
        ``free_sets`` that hold these problems' warm starts."""
        a = len(gramian)
        g = gramian
        if self.reg_eps:
            g = g / g.trace().clamp_min(1e-300) + self.reg_eps * torch.eye(a, dtype=g.dtype, device=g.device)
        cols = (self.active_index if self.active_index is not None else torch.arange(a)).to(
            self.free_sets.device
        )
        rows = rows.to(self.free_sets.device)
        bound = self.task_names is not None
        warm = self.free_sets[rows][:, cols] if self.warm_start and bound else None
        v, free = project_weights(g, lower, free=warm)
        if bound:
            kept = self.free_sets.clone()
            kept[rows[:, None], cols[None, :]] = free.to(kept.device)
            self.free_sets = kept
        return v
