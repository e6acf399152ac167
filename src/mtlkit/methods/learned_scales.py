"""Loss weightings with learnable per-task scales: UW (uncertainty weighting) and IMTL-L."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.errors import CheckpointError, TaskError
from mtlkit.methods.base import LossWeighting, state_copy
from mtlkit.methods.registry import register


class LearnedScales(LossWeighting):
    """Shared machinery: one learnable scalar ``s_k`` per task, optimised with the model.

    The parameters exist once the tasks are known (:meth:`~mtlkit.methods.Method.setup`, which the
    Trainer calls); the Trainer then adds them to the optimiser without weight decay and with
    ``lr`` (``None``: the optimiser's learning rate). In a user's loop: ``method.setup(names)``,
    then ``optimizer.add_param_group(g)`` for each ``g`` in ``method.param_groups()``.
    """

    init: float = 0.0

    def __init__(self, lr: float | None = None, init: float | None = None) -> None:
        super().__init__()
        if lr is not None and not lr > 0:
            raise TaskError(f"{type(self).__name__} lr must be > 0 or None, got {lr!r}.")
        self.parameter_lr = lr
        if init is not None:
            self.init = float(init)
        self.scales: nn.Parameter | None = None

    def _build(self, num_tasks: int) -> None:
        self.scales = nn.Parameter(torch.full((num_tasks,), self.init))

    def _scales(self) -> nn.Parameter:
        if self.scales is None:
            raise TaskError(
                f"{type(self).__name__} has no parameters yet: call method.setup(task_names) before "
                "building the optimiser (the Trainer does this)."
            )
        return self.scales

    def parameters(self) -> list[nn.Parameter]:
        return [self._scales()]

    def to(self, device: torch.device | str) -> LearnedScales:
        if self.scales is not None:  # in place: the optimiser keeps its reference
            self.scales.data = self.scales.data.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["scales"] = state_copy(self.scales)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        saved = state.get("scales")
        if saved is None:
            return
        scales = self._scales()
        if tuple(saved.shape) != tuple(scales.shape):
            raise CheckpointError(
                f"{type(self).__name__} state has {tuple(saved.shape)} scales, this method has {tuple(scales.shape)}."
            )
        with torch.no_grad():
            scales.copy_(saved)


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
class UW(LearnedScales):
    """Uncertainty weighting: Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to
    Weigh Losses for Scene Geometry and Semantics", CVPR 2018.

    Objective ``sum_k [exp(-s_k) L_k / 2 + s_k / 2]`` with ``s_k = log sigma_k^2`` learned jointly
    with the model. This is the single form that every public MTL benchmark code uses for all tasks
    (nash-mtl, FAMO, ANT; LibMTL's ``L/(2e^s) + s/2`` is the same); the paper's separate
    classification form ``1/sigma^2`` is not used there. For a fixed loss the optimum is
    ``exp(s_k) = L_k``. The reported weight of task k is ``exp(-s_k) / 2``.

    Args:
        lr: learning rate of ``s`` (default 0.025, the ``--method-params-lr`` of the nash-mtl,
            FAMO and DiBS-MTL benchmark scripts; ``None``: the optimiser's learning rate, as LibMTL).
        init: initial ``s_k`` (0 as in nash-mtl/FAMO; LibMTL and MTAN use -0.5).
        min_log_var: ``s_k`` is clamped from below at this value (our guard, not in the paper: a
            loss that goes to 0 drives ``s_k -> log L_k -> -inf`` and the weight ``exp(-s_k)`` to
            infinity). Below the bound only gradients that raise ``s_k`` pass, so it recovers when
            the loss grows again. ``None`` disables it.
    """

    name = "uw"

    def __init__(
        self, lr: float | None = 0.025, init: float = 0.0, min_log_var: float | None = -10.0
    ) -> None:
        super().__init__(lr=lr, init=init)
        self.min_log_var = min_log_var

    def _log_vars(self) -> Tensor:
        s = self._scales()
        return s if self.min_log_var is None else _ClampFromBelow.apply(s, self.min_log_var)

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        # one clamped tensor for both terms, so the clamp sees (and gates) their total gradient
        self._step_log_vars = self._log_vars()
        s = self._step_log_vars.to(losses.device)
        return torch.where(active, 0.5 * torch.exp(-s), 0.0)

    def regularizer(self, active: Tensor) -> Tensor:
        s = self._step_log_vars
        self._step_log_vars = None
        return 0.5 * torch.where(active.to(s.device), s, 0.0).sum()

    def __repr__(self) -> str:
        return f"UW(lr={self.parameter_lr!r}, init={self.init!r}, min_log_var={self.min_log_var!r})"


@register("imtl_l")
class IMTLL(LearnedScales):
    """IMTL-L, the loss-balancing half of Liu et al., "Towards Impartial Multi-task Learning",
    ICLR 2021.

    Each loss is replaced by ``exp(s_k) L_k - s_k`` with a learnable ``s_k`` (init 0), minimised
    jointly with the model; at the optimum in ``s``, ``exp(s_k) L_k = 1``: every scaled loss is 1.
    The reported weight of task k is ``exp(s_k)``. No official code was released; defaults follow
    LibMTL (init 0, the optimiser's learning rate).

    Args:
        lr: learning rate of ``s`` (``None``: the optimiser's, as in LibMTL).
    """

    name = "imtl_l"

    def __init__(self, lr: float | None = None) -> None:
        super().__init__(lr=lr, init=0.0)

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        s = self._scales().to(losses.device)
        return torch.where(active, torch.exp(s), 0.0)

    def regularizer(self, active: Tensor) -> Tensor:
        s = self._scales()
        return -torch.where(active.to(s.device), s, 0.0).sum()

    def __repr__(self) -> str:
        return f"IMTLL(lr={self.parameter_lr!r})"
