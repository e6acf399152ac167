"""GradNorm: gradient normalisation for adaptive loss balancing (Chen et al., ICML 2018)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mtlkit.core.engine import GradientEngine, as_param_list
from mtlkit.errors import CheckpointError, EngineError, NonPositiveLossError, TaskError
from mtlkit.methods.base import LossWeighting, StepInfo, state_copy, state_to
from mtlkit.methods.registry import register

Layer = Literal["last", "all"] | str | nn.Module | Iterable[Tensor] | None


@register("gradnorm")
class GradNorm(LossWeighting):
    """GradNorm: Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient Normalization for
    Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018.

    Each step, with ``n_k = ||dL_k/dW||`` at a chosen shared layer ``W`` (one small
    vector-Jacobian product per task from the shared engine), ``G_k = w_k n_k``, ``Gbar`` their
    mean, ``r_k = (L_k / L_k(0)) / mean_j (L_j / L_j(0))``:

    1. ``L_grad = sum_k |G_k - Gbar r_k^alpha|`` with the target ``Gbar r_k^alpha`` held constant;
       its gradient w.r.t. the weights goes to ``.grad`` of the weight parameters, which the
       optimiser updates with the model (the Trainer adds them, without weight decay);
    2. the model gets one backward of ``sum_k w_k L_k`` with the current (pre-update) weights.

    The weights are parametrised as ``w = K softmax(v)`` (as in LibMTL), which keeps them positive
    and summing to K: the paper's renormalisation to ``sum w = K``, without the negative weights
    its plain parametrisation can reach.

    Args:
        alpha: the asymmetry (official default 1.5).
        layer: where the gradient norms are taken. ``"last"`` (default): the model's last shared
            layer of weights (``model.last_shared_parameters()``, bound by
            :meth:`~mtlkit.methods.Method.setup`, which the Trainer calls), as in the paper.
            ``"all"``: every shared parameter (LibMTL's choice; K full backwards). A parameter
            name prefix (e.g. ``"bottom.2"``), a module or a list of parameters picks another.
        lr: learning rate of ``v`` (``None``: the optimiser's, as in LibMTL).
        initial: ``L_k(0)``: ``"first_step"`` (the paper: the loss at the first step in which the
            task is labelled) or ``"first_epoch"`` (LibMTL: the mean loss of epoch 0, trained with
            equal weights; the caller ends epochs with :meth:`on_epoch_end`).
        engine: the :class:`~mtlkit.core.engine.GradientEngine` for the per-task norms.

    Losses must be >= 0 and ``L_k(0) > 0`` (:class:`~mtlkit.errors.NonPositiveLossError`).
    """

    name = "gradnorm"
    hooks = frozenset({"epoch_end"})
    requires = frozenset({"losses", "layer_gradient_norms"})

    def __init__(
        self,
        alpha: float = 1.5,
        layer: Layer = "last",
        lr: float | None = None,
        initial: Literal["first_step", "first_epoch"] = "first_step",
        engine: GradientEngine | None = None,
    ) -> None:
        super().__init__()
        if not alpha >= 0:
            raise TaskError(f"GradNorm alpha must be >= 0, got {alpha!r}.")
        if initial not in ("first_step", "first_epoch"):
            raise TaskError(f"GradNorm initial must be 'first_step' or 'first_epoch', got {initial!r}.")
        if lr is not None and not lr > 0:
            raise TaskError(f"GradNorm lr must be > 0 or None, got {lr!r}.")
        self.alpha = float(alpha)
        self.initial = initial
        self.parameter_lr = lr
        self.engine = engine or GradientEngine()
        self.layer_spec = layer if isinstance(layer, (str, type(None))) else "given"
        self._layer: list[Tensor] | None = None
        if isinstance(layer, nn.Module):
            self._layer = [p for p in layer.parameters() if p.requires_grad]
        elif layer is not None and not isinstance(layer, str):
            self._layer = as_param_list(layer)
        if self._layer is not None and not self._layer:
            raise TaskError("GradNorm got a layer without trainable parameters.")
        self.logits: nn.Parameter | None = None
        self.initial_losses: Tensor | None = None  # L_k(0); NaN until known
        self.epoch = 0
        self._sum: Tensor | None = None
        self._count: Tensor | None = None

    # -- set-up -----------------------------------------------------------------------------------
    def _build(self, num_tasks: int) -> None:
        self.logits = nn.Parameter(torch.zeros(num_tasks))
        self.initial_losses = torch.full((num_tasks,), torch.nan, dtype=torch.float64)

    def _attach(self, model: Any) -> None:
        if self.layer_spec == "last":
            if not callable(getattr(model, "last_shared_parameters", None)):
                raise TaskError(
                    f"GradNorm(layer='last') needs model.last_shared_parameters(); {type(model).__name__} "
                    "has none. Pass layer= (a module, parameters or a parameter-name prefix)."
                )
            self._layer = [p for p in model.last_shared_parameters() if p.requires_grad]
            if not self._layer:
                raise TaskError(
                    f"GradNorm(layer='last'): {type(model).__name__}'s last shared layer has no trainable "
                    "weight (frozen?). Pass layer= with trainable shared parameters."
                )
        elif isinstance(self.layer_spec, str) and self.layer_spec != "all":
            prefix = self.layer_spec
            self._layer = [
                p
                for n, p in model.named_parameters()
                if (n == prefix or n.startswith(prefix + ".")) and p.requires_grad
            ]
            if not self._layer:
                raise TaskError(
                    f"GradNorm: no trainable parameter of the model is named {prefix!r} or under it."
                )

    def _layer_params(self, shared: Iterable[Tensor] | None) -> list[Tensor]:
        if self.layer_spec == "all":
            params = as_param_list(shared)
            if not params:
                raise EngineError("GradNorm(layer='all') needs shared= (the shared parameters).")
            return params
        if self._layer is None:
            raise EngineError(
                "GradNorm does not know its layer yet: call method.setup(task_names, model=model) "
                "(the Trainer does) or pass layer= (a module or its parameters)."
            )
        return self._layer

    def parameters(self) -> list[nn.Parameter]:
        if self.logits is None:
            raise TaskError("GradNorm has no parameters yet: call method.setup(task_names) first.")
        return [self.logits]

    # -- the step -----------------------------------------------------------------------------------
    def backward(self, losses, shared=None, features=None, task_specific=None, loss_scale=None) -> StepInfo:
        names, values, labelled, unscaled = self._prepare(losses, loss_scale)
        active = self._active(values, labelled)
        self._require_positive(names, unscaled, active, allow_zero=True)
        assert self.logits is not None and self.initial_losses is not None
        balancing = self.initial == "first_step" or self.epoch > 0
        layer = self._layer_params(shared) if balancing else []  # raises before any state changes
        device = unscaled.device
        if self.initial_losses.device != device:
            self.to(device)
        k = len(values)
        weights = k * torch.softmax(self.logits, dim=0)
        if self.initial == "first_step":
            new = active & torch.isnan(self.initial_losses)
            if bool(new.any()):
                self._set_initial(torch.where(new, unscaled.double(), self.initial_losses), names)
        elif self.epoch == 0:  # LibMTL: equal weights during epoch 0, which gives L(0)
            if self._sum is None:
                self._sum = torch.zeros(k, dtype=torch.float64, device=device)
                self._count = torch.zeros(k, dtype=torch.float64, device=device)
            self._sum += torch.where(active, unscaled.double(), 0.0)
            self._count += active
        known = active & ~torch.isnan(self.initial_losses)
        norms = None
        if balancing and bool(known.any()):
            norms = self.engine.task_gradient_norms(values, layer)
            if loss_scale is not None:
                norms = norms / float(loss_scale)
            if bool(torch.isfinite(norms).all()):  # else fp16 overflow: the scaler skips this step
                self._balance_step(weights, norms, unscaled, known, loss_scale)
        w = weights.detach()
        total = (w.to(values[0].dtype) * torch.stack(values)).sum()
        if total.requires_grad:
            total.backward()
        w = torch.where(active, w, 0.0)
        # grad_norms: ||dL_k/dW|| at the chosen layer (not the whole shared gradient)
        return StepInfo(names, w, unscaled, level="loss", grad_norms=norms)

    def _set_initial(self, values: Tensor, names: list[str]) -> None:
        bad = ~torch.isnan(values) & (values <= 0)
        if bool(bad.any()):
            raise NonPositiveLossError(
                f"GradNorm needs positive initial losses L(0); task(s) "
                f"{[n for n, b in zip(names, bad.tolist(), strict=True) if b]} have {values[bad].tolist()}."
            )
        self.initial_losses = values

    def _balance_step(
        self, weights: Tensor, norms: Tensor, losses: Tensor, known: Tensor, loss_scale: float | None
    ) -> None:
        """Put ``d L_grad / d v`` into ``v.grad`` (scaled like the model's gradients).

        Closed form instead of autograd on the K-vector (same value, a fraction of the time):
        ``dL_grad/dw_k = sign(G_k - target_k) n_k`` for the tasks in play, and through
        ``w = K softmax(v)``, ``dL_grad/dv = w * (a - <w, a> / K)`` with ``a = dL_grad/dw``.
        """
        assert self.logits is not None and self.initial_losses is not None
        w = weights.detach().double()
        g = w * norms  # G_k
        count = known.sum()
        g_bar = torch.where(known, g, 0.0).sum() / count
        rate = torch.where(known, losses.double() / self.initial_losses, 0.0)
        rel = rate / (rate.sum() / count)
        target = g_bar * rel.pow(self.alpha)
        a = torch.where(known, torch.sign(g - target) * norms, 0.0)
        grad = w * (a - (w * a).sum() / len(w))
        if loss_scale is not None:
            grad = grad * float(loss_scale)
        if self.logits.grad is None:
            self.logits.grad = grad.to(self.logits.dtype)
        else:
            self.logits.grad += grad.to(self.logits.dtype)

    def on_epoch_end(self) -> None:
        if self.initial == "first_epoch" and self.epoch == 0 and self._sum is not None:
            means = torch.where(self._count > 0, self._sum / self._count.clamp_min(1), torch.nan)
            self._set_initial(means, self.task_names or [])
            self._sum = self._count = None
        self.epoch += 1

    # -- state --------------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> GradNorm:
        if self.logits is not None:  # in place: the optimiser keeps its reference
            self.logits.data = self.logits.data.to(device)
        self.initial_losses, self._sum, self._count = state_to(
            (self.initial_losses, self._sum, self._count), device
        )
        return self

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            state_copy(
                {
                    "logits": self.logits,
                    "initial_losses": self.initial_losses,
                    "epoch": self.epoch,
                    "epoch_sum": self._sum,
                    "epoch_count": self._count,
                }
            )
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("logits") is None:
            return
        assert self.logits is not None
        if tuple(state["logits"].shape) != tuple(self.logits.shape):
            raise CheckpointError(
                f"GradNorm state has {tuple(state['logits'].shape)} weights, expected {tuple(self.logits.shape)}."
            )
        device = self.logits.device
        state = state_copy(dict(state))  # the accumulators are updated in place: never the caller's
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self.initial_losses = state["initial_losses"]
        self.epoch = int(state.get("epoch", 0))
        self._sum = state.get("epoch_sum")
        self._count = state.get("epoch_count")
        self.to(device)

    def __repr__(self) -> str:
        return f"GradNorm(alpha={self.alpha!r}, layer={self.layer_spec!r}, lr={self.parameter_lr!r}, initial={self.initial!r})"
