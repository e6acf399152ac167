"""UW: uncertainty weighting (Kendall, Gal, Cipolla, CVPR 2018)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.core.tasks import TaskSet
from mtlkit.methods.hparams import hparam, none, number
from mtlkit.methods.loss_weighting import LossWeighting
from mtlkit.methods.registry import register


class _ClampFromBelow(torch.autograd.Function):
    """``max(s, floor)`` whose gradient is blocked only where it would push ``s`` further below
    the floor: a plain clamp has zero gradient below it, so once momentum carries ``s`` past the
    floor it could never come back when the loss grows again."""

    @staticmethod
    def forward(ctx: Any, s: Tensor, floor: float) -> Tensor:
        ctx.save_for_backward(s)
        ctx.floor = floor
        return s.clamp(min=floor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (s,) = ctx.saved_tensors
        # gradient descent moves s by -grad: below the floor only grad < 0 (upwards) passes
        return torch.where((s > ctx.floor) | (grad < 0), grad, torch.zeros_like(grad)), None


@register("uw")
class UW(LossWeighting):
    """Uncertainty weighting: Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to
    Weigh Losses for Scene Geometry and Semantics", CVPR 2018.

    Objective ``sum_k [exp(-s_k) L_k / 2 + s_k / 2]`` with ``s_k = log sigma_k^2`` learned jointly
    with the model. This is the single form that every public MTL benchmark code uses for all tasks
    (nash-mtl, FAMO, ANT; LibMTL's ``L/(2e^s) + s/2`` is the same); the paper's separate
    classification form ``1/sigma^2`` is not used there. For a fixed loss the optimum is
    ``exp(s_k) = L_k``. The reported weight of task k is ``exp(-s_k) / 2``.

    The log-variances ``scales`` are parameters created by :meth:`setup`; the optimiser gets them
    from :meth:`param_groups` (lr ``lr``, no weight decay).
    """

    needs_setup = True
    scales: nn.Parameter
    lr: float | None = hparam(
        0.025,
        number(gt=0) | none(),
        "learning rate of s (the --method-params-lr of the nash-mtl, FAMO and DiBS-MTL scripts; "
        "None: the optimiser's, as LibMTL)",
    )
    init: float = hparam(0.0, number(), "initial s_k (0 as in nash-mtl/FAMO; LibMTL and MTAN use -0.5)")
    min_log_var: float | None = hparam(
        -10.0,
        number() | none(),
        "s_k is clamped from below here (our guard, not in the paper: a vanishing loss would send "
        "the weight exp(-s_k) to infinity); below it only gradients that raise s_k pass; None: off",
    )

    def _build(self, tasks: TaskSet) -> None:
        self.scales = nn.Parameter(torch.full((len(tasks),), float(self.init)))

    def parameter_lr(self) -> float | None:
        return self.lr

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        s = self.scales if self.min_log_var is None else _ClampFromBelow.apply(self.scales, self.min_log_var)
        # one clamped tensor for both terms, so the clamp sees (and gates) their total gradient
        self._step_log_vars = s
        return 0.5 * torch.exp(-s.to(losses.device))

    def regularizer(self, active: Tensor) -> Tensor:
        s = self._step_log_vars
        del self._step_log_vars
        return 0.5 * torch.where(active.to(s.device), s, 0.0).sum()
