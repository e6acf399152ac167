"""The loss-weighting family: methods that need only the loss values (one backward)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtlkit.methods.base import Method, StepInfo, StepInputs


class LossWeighting(Method):
    """A method that only needs the loss values: one backward of ``sum_k w_k L_k (+ R)``.

    Subclasses give the effective weights ``w`` (:meth:`loss_weights`, from the detached, unscaled
    losses; the base sets the weights of tasks without a labelled sample to 0) and, for learnable
    weightings, a regulariser ``R`` of their own parameters (:meth:`regularizer`). Methods defined
    through a nonlinear scalarisation (SI's ``sum log L_k``, GLS, FAMO, STCH) are back-propagated
    in this weighted form: the gradient is the same (the weights are the scalarisation's partial
    derivatives), no log or exp of a loss enters the graph, and a ``GradScaler`` scale passes
    through unchanged.
    """

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        """Weights (K,) for the detached unscaled losses; may carry grad for learnable weightings.
        ``active`` marks the tasks with a labelled sample (the others' losses are 0)."""
        raise NotImplementedError

    def regularizer(self, active: Tensor) -> Tensor | None:
        """A term of the objective that depends only on the method's own parameters (UW's
        ``sum s_k / 2``); ``None`` when there is none."""
        return None

    def after_backward(self, inputs: StepInputs) -> None:
        """Called after the backward (FAMO clips the shared gradient here)."""

    def step_extras(self) -> dict[str, Any]:
        """Method-specific values for :attr:`StepInfo.extras` (e.g. STCH's phase)."""
        return {}

    ddp_native = True

    def _step(self, inputs: StepInputs) -> StepInfo:
        values, active = inputs.values, inputs.active
        weights = self.loss_weights(inputs.losses, active)
        weights = torch.where(active, weights, torch.zeros_like(weights))
        reg = self.regularizer(active)
        if weights.requires_grad or reg is not None:  # learnable weights: the product form
            total = (weights.to(values[0].dtype) * torch.stack(values)).sum()
            if reg is not None:  # scaled like the losses, so a GradScaler's unscale_ sees one scale
                total = total + reg.to(total.dtype) * inputs.scale
            if total.requires_grad:
                total.backward()
        else:  # seed each loss with its weight: one backward pass, no stack/mul/sum nodes
            # a private copy: autograd may keep a seed as a leaf's .grad and accumulate into it later
            seeds = weights.to(values[0].dtype, copy=True).unbind()
            live = [
                (v, w if w.dtype == v.dtype else w.to(v.dtype))
                for v, w in zip(values, seeds, strict=True)
                if v.requires_grad
            ]
            if live:
                torch.autograd.backward([v for v, _ in live], grad_tensors=[w for _, w in live])
        inputs.after_reduce(lambda: self.after_backward(inputs))
        return StepInfo(
            inputs.names, weights.detach(), inputs.losses, level="loss", extras=self.step_extras()
        )
