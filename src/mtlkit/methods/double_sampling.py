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

from mtlkit.errors import NonFiniteGradientError
from mtlkit.methods.base import StepInfo, StepInputs
from mtlkit.methods.gradient_methods import GramianWeighting, clip_factor, gradient_statistics


class DoubleSamplingWeighting(GramianWeighting):
    """Weights ``w = weights(C)`` from the cross Gramian of the two extra batches; shared update
    ``J^T w`` on the step's own batch. Subclasses set :attr:`head_scale` (the factor on each
    batch's task-specific gradients) and implement :meth:`weights` on ``C``.

    Tasks count as active when they have a labelled sample in all three batches. Parameter level
    only (the cross Gramian of two representations would compare different samples).
    """

    #: factor on each of the three batches' own head gradients (1: summed, 1/3: averaged)
    head_scale: float = 1.0

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
        for batch in (first, second):
            jac = engine.jacobian(batch.values, shared, batch.task_specific, names=batch.names, owned=True)
            rows.append(jac.rows() / batch.scale)
            jac.write_heads(head_weights if self.head_scale != 1.0 else None)
        cross = rows[0].double() @ rows[1].double().T
        del rows
        active = inputs.active & first.active & second.active
        main = engine.jacobian(inputs.values, shared, inputs.task_specific, names=inputs.names)
        scoped = StepInputs(
            inputs.names, inputs.values, inputs.losses, active, inputs.loss_scale, None, shared, None
        )
        w = self._solve(cross, scoped)
        direction = main.rows().T @ w.to(main.rows().dtype)
        max_norm = self._max_norm()
        if max_norm is not None:
            direction = direction * clip_factor(
                torch.linalg.vector_norm(direction.double()) / inputs.scale, max_norm
            )
        if not bool(torch.isfinite(direction).all()) and inputs.loss_scale is None:
            raise NonFiniteGradientError(f"{type(self).__name__} produced a non-finite direction.")
        main.write_shared_flat(direction)
        main.write_heads(head_weights if self.head_scale != 1.0 else None)
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


def cross_diagonal(cross: Tensor) -> Tensor:
    """The diagonal of a cross Gramian, clamped at 0 (an unbiased estimate of ``||g_k||^2`` that
    can come out negative)."""
    return cross.diagonal().clamp_min(0)
