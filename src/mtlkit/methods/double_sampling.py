"""Methods that weigh the tasks from a cross Gramian of two independent batches and apply the
weights to the gradients of a third (MoDo; SDMGrad with independent batches).

With stochastic gradients the Gramian of one batch is a biased estimate of ``G = E[J] E[J]^T``;
the cross Gramian ``C = J_1 J_2^T`` of two independent batches is unbiased (it is not symmetric and
not positive semi-definite). One step uses three batches (``batches_per_step = 3``: the step's
losses give the direction's batch, ``extra_losses`` the two others), so 3K per-task backward
passes: the Trainer draws the batches, a user's loop passes ``extra_losses``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtlkit.core.tasks import TaskSet
from mtlkit.errors import NonFiniteGradientError
from mtlkit.methods.base import StepInfo, StepInputs
from mtlkit.methods.gradient_methods import GramianWeighting, gradient_statistics
from mtlkit.methods.min_norm import project_simplex


class DoubleSamplingWeighting(GramianWeighting):
    """Weights ``w = weights(C)`` from the cross Gramian of the two extra batches; shared update
    ``J^T w`` on the step's own batch, from one backward of ``sum_k w_k L_k`` (2K + 1 backward
    passes per step). Subclasses set :attr:`head_scale` (the factor on each
    batch's task-specific gradients) and implement :meth:`weights` on ``C``.

    Tasks count as active when they have a labelled sample in all three batches. Parameter level
    only (the cross Gramian of two representations would compare different samples).
    """

    #: factor on each of the three batches' own head gradients (1: summed, 1/3: averaged)
    head_scale: float = 1.0
    previous: Tensor

    def _build(self, tasks: TaskSet) -> None:
        # the weights carried from step to step (both methods start at 1/K)
        self.register_buffer("previous", torch.full((len(tasks),), 1.0 / len(tasks), dtype=torch.float64))

    def carried_weights(self, gramian: Tensor) -> Tensor:
        """The previous step's weights of the active tasks (projected onto their simplex when some
        tasks are left out), on the Gramian's device."""
        a = len(gramian)
        index = self.active_index if self.active_index is not None else torch.arange(a)
        w = self.previous[index.to(self.previous.device)].to(gramian.device)
        return project_simplex(w) if a < len(self.previous) else w

    def carry(self, w: Tensor) -> None:
        """Keep the active tasks' new weights for the next step."""
        index = self.active_index if self.active_index is not None else torch.arange(len(w))
        kept = self.previous.clone()
        kept[index.to(kept.device)] = w.to(kept)
        self.previous = kept

    @property
    def batches_per_step(self) -> int:
        return 3

    def _step(self, inputs: StepInputs) -> StepInfo:
        if self.batches_per_step == 1:
            return super()._step(inputs)
        engine = self._engine()
        shared = self._shared(inputs)
        k = len(inputs.names)
        head_weights = torch.full((k,), self.head_scale, dtype=torch.float64)
        first, second = inputs.extra
        rows = []
        for i, batch in enumerate((first, second)):  # the first batch's rows must outlive the second call
            jac = engine.jacobian(batch.values, shared, batch.task_specific, names=batch.names, owned=i == 0)
            rows.append(jac.rows() if batch.loss_scale is None else jac.rows() / batch.scale)
            jac.write_heads(head_weights if self.head_scale != 1.0 else None)
        cross = (rows[0] @ rows[1].T).double() if rows[0].dtype == torch.float64 else _cross(rows[0], rows[1])
        del rows
        active = inputs.active & first.active & second.active
        scoped = StepInputs(
            inputs.names, inputs.values, inputs.losses, active, inputs.loss_scale, inputs._model, shared, None
        )
        w = self._solve(cross, scoped)
        if not bool(torch.isfinite(w).all()) and inputs.loss_scale is None:
            raise NonFiniteGradientError(f"{type(self).__name__} produced non-finite weights.")
        # The step's own batch needs no per-task gradients: one backward of sum_k w_k L_k for the
        # shared parameters (clipped), the heads' own gradients from their part of the graph.
        self._weighted_backward(scoped, w, own_heads_scale=self.head_scale)
        norms, cos = gradient_statistics(cross)
        return StepInfo(
            inputs.names,
            w.detach(),
            inputs.losses,
            level="parameter",
            grad_norms=norms,
            cosines=cos,
            gramian=cross,
            extras=self.step_extras(),
        )

    def step_extras(self) -> dict[str, Any]:
        return {}


def _cross(a: Tensor, b: Tensor, columns: int = 1 << 15) -> Tensor:
    """``a b^T`` accumulated in float64 over column chunks (no float64 copy of either matrix)."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], columns):
        out += (a[:, start : start + columns] @ b[:, start : start + columns].T).double()
    return out


def cross_diagonal(cross: Tensor) -> Tensor:
    """The diagonal of a cross Gramian, clamped at 0 (an unbiased estimate of ``||g_k||^2`` that
    can come out negative)."""
    return cross.diagonal().clamp_min(0)
