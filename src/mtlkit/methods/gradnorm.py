"""GradNorm: gradient normalisation for adaptive loss balancing (Chen et al., ICML 2018)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mtlkit.core.contract import unwrap
from mtlkit.core.engine import GradientEngine, as_param_list
from mtlkit.core.tasks import TaskSet
from mtlkit.errors import ConfigError, EngineError, LifecycleError, NonPositiveLossError
from mtlkit.methods.base import StepInfo, StepInputs
from mtlkit.methods.hparams import Check, hparam, instance_of, none, number, one_of
from mtlkit.methods.loss_weighting import LossWeighting
from mtlkit.methods.registry import register

Layer = str | nn.Module | Iterable[Tensor]


def _is_parameter_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(p, Tensor) for p in v)


@register("gradnorm")
class GradNorm(LossWeighting):
    """GradNorm: Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient Normalization for
    Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018.

    Each step, with ``n_k = ||dL_k/dW||`` at a chosen shared layer ``W`` (one small
    vector-Jacobian product per task from the shared engine), ``G_k = w_k n_k``, ``Gbar`` their
    mean, ``r_k = (L_k / L_k(0)) / mean_j (L_j / L_j(0))``:

    1. ``L_grad = sum_k |G_k - Gbar r_k^alpha|`` with the target ``Gbar r_k^alpha`` held constant;
       its gradient w.r.t. the weights goes to ``.grad`` of the weight parameters, which the
       optimiser updates with the model (from :meth:`param_groups`, without weight decay);
    2. the model gets one backward of ``sum_k w_k L_k`` with the current (pre-update) weights.

    The weights are parametrised as ``w = K softmax(v)`` (as in LibMTL), which keeps them positive
    and summing to K: the paper's renormalisation to ``sum w = K``, without the negative weights
    its plain parametrisation can reach. ``layer="last"`` takes the model's
    ``last_shared_parameters()`` (bound by :meth:`setup`), as in the paper; ``"all"`` every shared
    parameter (LibMTL's choice; K full backwards); a parameter-name prefix, a module or a list of
    parameters picks another. ``initial`` sets ``L_k(0)``: ``"first_step"`` (the paper: the loss at
    the first step in which the task is labelled) or ``"first_epoch"`` (LibMTL: the mean loss of
    epoch 0, trained with equal weights).

    Losses must be >= 0 and ``L_k(0) > 0`` (:class:`~mtlkit.errors.NonPositiveLossError`).
    """

    needs_setup = True
    logits: nn.Parameter
    initial_losses: Tensor
    epoch_sum: Tensor
    epoch_count: Tensor
    alpha: float = hparam(1.5, number(ge=0), "the asymmetry (official default 1.5)")
    layer: Layer = hparam(
        "last",
        instance_of(str, nn.Module) | Check(_is_parameter_list, "a list of parameters"),
        "where the gradient norms are taken: 'last', 'all', a parameter-name prefix, a module or parameters",
    )
    lr: float | None = hparam(
        None, number(gt=0) | none(), "learning rate of v (None: the optimiser's, as LibMTL)"
    )
    initial: Literal["first_step", "first_epoch"] = hparam(
        "first_step", one_of("first_step", "first_epoch"), "how L(0) is taken"
    )
    engine: GradientEngine | None = hparam(
        None, instance_of(GradientEngine) | none(), "the engine for the per-task norms", config=False
    )

    def _validate(self) -> None:
        self._norm_engine = self.engine or GradientEngine()
        self._layer: list[Tensor] | None = None
        if isinstance(self.layer, nn.Module):
            self._layer = [p for p in self.layer.parameters() if p.requires_grad]
        elif not isinstance(self.layer, str):
            self._layer = as_param_list(self.layer)
        if self._layer is not None and not self._layer:
            raise ConfigError("GradNorm got a layer without trainable parameters.")

    def _build(self, tasks: TaskSet) -> None:
        k = len(tasks)
        self.logits = nn.Parameter(torch.zeros(k))
        self.register_buffer("initial_losses", torch.full((k,), torch.nan, dtype=torch.float64))
        self.register_buffer("epoch_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("epoch_count", torch.zeros(k, dtype=torch.float64))
        self.epoch = 0

    def _attach(self, model: nn.Module) -> None:
        model = unwrap(model)
        if self.layer == "last":
            last = getattr(model, "last_shared_parameters", None)
            if not callable(last):
                raise ConfigError(
                    f"GradNorm(layer='last') needs model.last_shared_parameters(); {type(model).__name__} "
                    "has none. Pass layer= (a module, parameters or a parameter-name prefix)."
                )
            self._layer = [p for p in last() if p.requires_grad]
            if not self._layer:
                raise ConfigError(
                    f"GradNorm(layer='last'): {type(model).__name__} has no trainable last shared layer "
                    "(frozen, or a model that shares nothing such as soft parameter sharing). Pass "
                    "layer= with trainable parameters every task reaches."
                )
        elif isinstance(self.layer, str) and self.layer != "all":
            prefix = self.layer
            self._layer = [
                p
                for n, p in model.named_parameters()
                if (n == prefix or n.startswith(prefix + ".")) and p.requires_grad
            ]
            if not self._layer:
                raise ConfigError(
                    f"GradNorm: no trainable parameter of the model is named {prefix!r} or under it."
                )

    def _layer_params(self, inputs: StepInputs) -> list[Tensor]:
        if self.layer == "all":
            if not inputs.knows_shared:
                raise EngineError("GradNorm(layer='all') needs the model (or shared=) in backward().")
            return inputs.shared
        if self._layer is None:
            raise LifecycleError(
                f"GradNorm(layer={self.layer!r}) does not know its layer yet: call "
                "method.setup(tasks, model=model) (the Trainer and Driver do)."
            )
        return self._layer

    def parameter_lr(self) -> float | None:
        return self.lr

    # -- the step -----------------------------------------------------------------------------------
    def _step(self, inputs: StepInputs) -> StepInfo:
        values, unscaled, active = inputs.values, inputs.losses, inputs.active
        self._require_positive(inputs.names, unscaled, active, allow_zero=True)
        balancing = self.initial == "first_step" or self.epoch > 0
        layer = self._layer_params(inputs) if balancing else []  # raises before any state changes
        k = len(values)
        weights = k * torch.softmax(self.logits, dim=0)
        if self.initial == "first_step":
            new = active & torch.isnan(self.initial_losses)
            if bool(new.any()):
                self._set_initial(torch.where(new, unscaled.double(), self.initial_losses), inputs.names)
        elif self.epoch == 0:  # LibMTL: equal weights during epoch 0, which gives L(0)
            self.epoch_sum = self.epoch_sum + torch.where(active, unscaled.double(), 0.0)
            self.epoch_count = self.epoch_count + active
        known = active & ~torch.isnan(self.initial_losses)
        norms = None
        if balancing and bool(known.any()):
            if inputs.parallel is None:
                norms = self._norm_engine.task_gradient_norms(values, layer) / inputs.scale
            else:  # the norms of the global batch's gradients: average the gradients first
                rows = self._norm_engine.task_gradients(values, layer)
                inputs.parallel.average_([rows])
                norms = torch.linalg.vector_norm(rows.double(), dim=1) / inputs.scale
            if bool(torch.isfinite(norms).all()):  # else fp16 overflow: the scaler skips this step
                self._balance_step(weights, norms, unscaled, known, inputs.scale)
        w = weights.detach()
        total = (w.to(values[0].dtype) * torch.stack(values)).sum()
        if total.requires_grad:
            total.backward()
        w = torch.where(active, w, 0.0)
        # grad_norms: ||dL_k/dW|| at the chosen layer (not the whole shared gradient)
        return StepInfo(inputs.names, w, unscaled, level="loss", grad_norms=norms)

    def _set_initial(self, values: Tensor, names: list[str]) -> None:
        bad = ~torch.isnan(values) & (values <= 0)
        if bool(bad.any()):
            raise NonPositiveLossError(
                f"GradNorm needs positive initial losses L(0); task(s) "
                f"{[n for n, b in zip(names, bad.tolist(), strict=True) if b]} have {values[bad].tolist()}."
            )
        self.initial_losses = values

    def _balance_step(
        self, weights: Tensor, norms: Tensor, losses: Tensor, known: Tensor, scale: float
    ) -> None:
        """Put ``d L_grad / d v`` into ``v.grad`` (scaled like the model's gradients).

        Closed form instead of autograd on the K-vector (same value, a fraction of the time):
        ``dL_grad/dw_k = sign(G_k - target_k) n_k`` for the tasks in play, and through
        ``w = K softmax(v)``, ``dL_grad/dv = w * (a - <w, a> / K)`` with ``a = dL_grad/dw``.
        """
        w = weights.detach().double()
        g = w * norms  # G_k
        count = known.sum()
        g_bar = torch.where(known, g, 0.0).sum() / count
        rate = torch.where(known, losses.double() / self.initial_losses, 0.0)
        rel = rate / (rate.sum() / count)
        target = g_bar * rel.pow(self.alpha)
        a = torch.where(known, torch.sign(g - target) * norms, 0.0)
        grad = (w * (a - (w * a).sum() / len(w)) * scale).to(self.logits.dtype)
        if self.logits.grad is None:
            self.logits.grad = grad
        else:
            self.logits.grad += grad

    def _epoch_end(self) -> None:
        if self.initial == "first_epoch" and self.epoch == 0:
            count = self.epoch_count
            means = torch.where(count > 0, self.epoch_sum / count.clamp_min(1), torch.nan)
            self._set_initial(means, self.task_names or [])
        self.epoch += 1

    def _extra_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
