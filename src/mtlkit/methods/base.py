"""The multi-task method interface shared by every loss weighting and gradient aggregator.

``method.backward(losses, shared=..., features=..., task_specific=...) -> StepInfo`` fills ``.grad``
of every parameter (accumulating, like ``Tensor.backward``): shared parameters get the method's
combined direction, task-specific parameters their own task's gradient or the weighted one.

Families:
- :class:`LossWeighting` -- needs only the loss values; one backward of ``sum_k w_k L_k``.
- :class:`GramianWeighting` -- ``w = f(G)`` from the Gramian of per-task gradients, computed by the
  engine at the parameter or the representation level; then ``J^T w``.
- methods that need the per-task gradients themselves use the engine's Jacobian path
  (:meth:`~mtlkit.core.engine.GradientEngine.jacobian`, then ``ParameterJacobian.write_shared``).

A method declares what it needs in ``requires`` and which lifecycle hooks it uses
(``"post_step_losses"`` -> :meth:`Method.after_step`, ``"epoch_end"`` -> :meth:`Method.on_epoch_end`).
The caller (the Trainer or a user's loop) calls the hooks; no method reads trainer attributes.
Before training the caller also calls :meth:`Method.setup` once with the task names (and the
model), so that methods with learnable parameters can create them before the optimiser is built,
and adds :meth:`Method.param_groups` to the optimiser.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from mtlkit.core.engine import GradientEngine, HeadGrad, TaskParams, as_param_list
from mtlkit.errors import (
    EngineError,
    NonFiniteGradientError,
    NonFiniteLossError,
    NonPositiveLossError,
    TaskError,
)

Level = Literal["parameter", "representation"]


@dataclass
class StepInfo:
    """What a method did in one step. Tensors are detached and stay on the device (no host sync).

    Attributes:
        task_names: task order of every vector and matrix below.
        weights: effective weight of each task's loss in the shared update (``d = J^T w``).
        losses: the task losses seen by the method.
        grad_norms: per-task gradient norms (when per-task gradients were computed).
        cosines: K x K pairwise cosine similarities of the task gradients (idem).
        gramian: the float64 Gramian the weights were computed from (idem).
        level: ``"loss"``, ``"parameter"`` or ``"representation"``.
    """

    task_names: list[str]
    weights: Tensor
    losses: Tensor
    level: str = "loss"
    grad_norms: Tensor | None = None
    cosines: Tensor | None = None
    gramian: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        """Flat ``{name: float}`` for logging (this is where the host sync happens)."""
        out: dict[str, float] = {}
        w = self.weights.detach().float().cpu().tolist()
        losses = self.losses.detach().float().cpu().tolist()
        for i, name in enumerate(self.task_names):
            out[f"weight/{name}"] = w[i]
            out[f"loss/{name}"] = losses[i]
        if self.grad_norms is not None:
            norms = self.grad_norms.detach().float().cpu().tolist()
            for i, name in enumerate(self.task_names):
                out[f"grad_norm/{name}"] = norms[i]
        if self.cosines is not None:
            cos = self.cosines.detach().float().cpu().tolist()
            for i, a in enumerate(self.task_names):
                for j in range(i + 1, len(self.task_names)):
                    out[f"cosine/{a}~{self.task_names[j]}"] = cos[i][j]
        return out


def state_copy(obj: Any) -> Any:
    """``obj`` (a tensor, ``None``, or a dict/list/tuple of them and plain values) with every
    tensor detached and cloned to the CPU: what a method's ``state_dict`` returns, so a saved state
    never aliases the live one."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: state_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(state_copy(v) for v in obj)
    return obj


def state_to(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor in it moved to ``device`` (``None`` and plain values unchanged)."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: state_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(state_to(v, device) for v in obj)
    return obj


def gradient_statistics(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Per-task gradient norms and pairwise cosines from a Gramian (zero norms give cosine 0)."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))
    return norms, cos


def unscale_gramian(gram: Tensor, loss_scale: float | None) -> Tensor:
    """The Gramian of unscaled gradients from one of gradients of losses scaled by ``loss_scale``."""
    return gram if loss_scale is None else gram / float(loss_scale) ** 2


class Method:
    """Base class of every multi-task optimisation method (see the module docstring)."""

    #: Registry name.
    name: ClassVar[str] = "method"
    #: What the method consumes: "losses", "gramian", "rep_gramian", "jacobian",
    #: "layer_gradient_norms" (GradNorm).
    requires: ClassVar[frozenset[str]] = frozenset({"losses"})
    #: Lifecycle hooks the caller must invoke: "post_step_losses", "epoch_end", "extra_batches".
    hooks: ClassVar[frozenset[str]] = frozenset()

    def __init__(self) -> None:
        self.task_names: list[str] | None = None

    # -- input checks ------------------------------------------------------------------------------
    def _prepare(
        self, losses: Mapping[str, Tensor] | Sequence[Tensor], loss_scale: float | None = None
    ) -> tuple[list[str], list[Tensor], Tensor | None, Tensor]:
        """Check the losses; return names, scalar losses, label counts and the detached unscaled
        loss vector."""
        if isinstance(losses, Mapping):
            names = list(losses)
            values = list(losses.values())
            labelled = getattr(losses, "labelled", None)
        else:
            values = list(losses)
            # positional losses: the bound task names when the count fits, else "0", "1", ...
            same = self.task_names is not None and len(self.task_names) == len(values)
            names = list(self.task_names) if same else [str(i) for i in range(len(values))]
            labelled = None
        if not values:
            raise TaskError("method.backward() got no task losses.")
        for n, v in zip(names, values, strict=True):
            if not isinstance(v, Tensor) or v.numel() != 1:
                raise TaskError(
                    f"Task {n!r}: a loss must be a scalar tensor, got "
                    f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}."
                )
        values = [v.reshape(()) for v in values]
        self.setup(names)
        stacked = torch.stack([v.detach() for v in values])
        if loss_scale is not None:
            stacked = stacked / loss_scale
        finite = torch.isfinite(stacked)
        if not bool(finite.all()):
            bad = [n for n, ok in zip(names, finite.tolist(), strict=True) if not ok]
            raise NonFiniteLossError(
                f"Non-finite loss for task(s) {bad} (values {stacked.tolist()}); nothing was updated. "
                "Check the inputs and targets of these tasks, or lower the learning rate."
            )
        return names, values, labelled, stacked

    @staticmethod
    def _active(values: Sequence[Tensor], labelled: Tensor | None) -> Tensor:
        req = torch.tensor([v.requires_grad for v in values], device=values[0].device)
        return req if labelled is None else req & (labelled.to(values[0].device) > 0)

    def _require_positive(
        self, names: Sequence[str], losses: Tensor, active: Tensor, allow_zero: bool = False
    ) -> None:
        """Raise :class:`NonPositiveLossError` if an active task's loss is ``<= 0`` (``< 0`` with
        ``allow_zero``): methods that take logarithms or ratios of the losses would produce NaN or
        infinite weights."""
        bad_mask = ((losses < 0) if allow_zero else (losses <= 0)) & active.to(losses.device)
        if bool(bad_mask.any()):
            bad = [n for n, b in zip(names, bad_mask.tolist(), strict=True) if b]
            raise NonPositiveLossError(
                f"{type(self).__name__} needs every task loss to be {'>= 0' if allow_zero else '> 0'}; "
                f"task(s) {bad} have {losses[bad_mask].tolist()}. Nothing was updated. Use a "
                "non-negative loss (e.g. MSE, cross-entropy) for these tasks, or another method."
            )

    # -- lifecycle -----------------------------------------------------------------------------------
    def setup(self, task_names: Sequence[str], model: Any | None = None) -> None:
        """Bind the method to a task set (and optionally the model) before training.

        The Trainer calls this once before the optimiser gets :meth:`param_groups`; in a user's
        loop, call it before building the optimiser if the method has learnable parameters (UW,
        IMTL-L, GradNorm). Later calls with the same tasks do nothing but bind a model; a different
        task list raises.
        """
        names = list(task_names)
        if self.task_names is None:
            if not names:
                raise TaskError(f"{type(self).__name__}.setup() got no task names.")
            self.task_names = names
            self._build(len(names))
        elif names != self.task_names:
            raise TaskError(
                f"{type(self).__name__} was first used with tasks {self.task_names}; now it got "
                f"{names}. Use one method object per task set (and the same task order)."
            )
        if model is not None:
            self._attach(model)

    def _build(self, num_tasks: int) -> None:
        """Create per-task state once the number of tasks is known (override as needed)."""

    def _attach(self, model: Any) -> None:
        """Take what the method needs from the model (override as needed; e.g. GradNorm's layer)."""

    # -- the interface -------------------------------------------------------------------------------
    def backward(
        self,
        losses: Mapping[str, Tensor] | Sequence[Tensor],
        shared: Iterable[Tensor] | None = None,
        features: Tensor | None = None,
        task_specific: TaskParams = None,
        loss_scale: float | None = None,
    ) -> StepInfo:
        """Fill ``.grad`` of every parameter from the task losses; return what was done.

        Args:
            losses: ``{task: scalar loss}`` (a :class:`~mtlkit.core.tasks.TaskLosses` also tells
                which tasks had no labelled sample) or a sequence of scalar losses.
            shared: the shared parameters (``model.shared_parameters()``).
            features: the shared representation, for representation-level methods.
            task_specific: ``{task: [params]}`` (``model.task_parameters()``), a flat list, or
                ``None`` to find them from the autograd graph.
            loss_scale: set when the losses were multiplied by a ``GradScaler`` scale: the method
                works on unscaled losses and gradients (Gramians stay float64), and leaves
                ``.grad`` scaled for ``scaler.unscale_``.
        """
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Method:
        """Move the method's own tensors (learnable weights, buffers) to ``device``."""
        return self

    def parameters(self) -> list[torch.nn.Parameter]:
        """Learnable parameters of the method itself (e.g. UW's log-variances); none by default."""
        return []

    #: Learning rate of the method's own parameters (``None``: the optimiser's default).
    parameter_lr: float | None = None

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups for :meth:`parameters`: no weight decay, and the method's
        own learning rate when it has one (``optimizer.add_param_group(g)`` for each)."""
        params = self.parameters()
        if not params:
            return []
        group: dict[str, Any] = {"params": params, "weight_decay": 0.0}
        if self.parameter_lr is not None:
            group["lr"] = self.parameter_lr
        return [group]

    def after_step(self, new_losses: Mapping[str, Tensor] | Sequence[Tensor]) -> None:
        """Hook called with the losses after the optimiser step (methods with "post_step_losses")."""

    def on_epoch_end(self) -> None:
        """Hook called at the end of each epoch (methods with "epoch_end")."""

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only, so checkpoints load with ``weights_only=True``."""
        return {"task_names": list(self.task_names) if self.task_names is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        names = state.get("task_names")
        if names is None:
            return
        if self.task_names is None:
            self.setup(list(names))
        elif list(names) != self.task_names:
            raise TaskError(
                f"This {type(self).__name__} state was saved for tasks {list(names)}, not {self.task_names}."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LossWeighting(Method):
    """A method that only needs the loss values: one backward of ``sum_k w_k L_k (+ R)``.

    Subclasses give the effective weights ``w`` (:meth:`loss_weights`, computed from the detached,
    unscaled losses) and, for learnable weightings, a regulariser ``R`` of their own parameters
    (:meth:`regularizer`). Methods defined through a nonlinear scalarisation (SI's ``sum log L_k``,
    GLS, FAMO, STCH) are back-propagated in this weighted form: the gradient is the same (the
    weights are the scalarisation's partial derivatives), no log or exp of a loss enters the
    graph, and a ``GradScaler`` scale passes through unchanged.
    """

    requires = frozenset({"losses"})
    #: The method takes logarithms of the losses: an active task's loss must be > 0.
    positive_losses: ClassVar[bool] = False

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        """Weights (K,) for the detached losses; may carry grad for learnable weightings.
        Inactive tasks (no labelled sample in the batch) must get weight 0."""
        raise NotImplementedError

    def regularizer(self, active: Tensor) -> Tensor | None:
        """A term of the objective that depends only on the method's own parameters (UW's
        ``sum s_k / 2``); ``None`` when there is none."""
        return None

    def backward(self, losses, shared=None, features=None, task_specific=None, loss_scale=None) -> StepInfo:
        names, values, labelled, unscaled = self._prepare(losses, loss_scale)
        active = self._active(values, labelled)
        if self.positive_losses:
            self._require_positive(names, unscaled, active)
        weights = self.loss_weights(unscaled, active)
        reg = self.regularizer(active)
        if weights.requires_grad or reg is not None:  # learnable weights: the product form
            total = (weights.to(values[0].dtype) * torch.stack(values)).sum()
            if reg is not None:  # scaled like the losses, so a GradScaler's unscale_ sees one scale
                total = total + reg.to(total.dtype) * (1.0 if loss_scale is None else float(loss_scale))
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
        self._after_backward(shared, loss_scale)
        return StepInfo(names, weights.detach(), unscaled, level="loss", extras=self.step_extras())

    def _after_backward(self, shared: Iterable[Tensor] | None, loss_scale: float | None) -> None:
        """Called after the backward (FAMO clips the shared gradient here)."""

    def step_extras(self) -> dict[str, Any]:
        """Method-specific values for :attr:`StepInfo.extras` (e.g. STCH's phase)."""
        return {}


class GramianWeighting(Method):
    """A method whose shared direction is ``J^T w`` with ``w = f(G)`` (G = J J^T).

    Args:
        level: ``"parameter"`` (Gramian of the shared-parameter gradients) or ``"representation"``
            (Gramian of the gradients w.r.t. the shared representation ``features``).
        head_grad: task-specific parameters get their ``"own"`` gradient or the ``"weighted"`` one.
        engine: the :class:`~mtlkit.core.engine.GradientEngine` to use.
    """

    requires = frozenset({"gramian"})
    default_head_grad: ClassVar[HeadGrad] = "weighted"

    def __init__(
        self,
        level: Level = "parameter",
        head_grad: HeadGrad | None = None,
        engine: GradientEngine | None = None,
    ) -> None:
        super().__init__()
        if level not in ("parameter", "representation"):
            raise EngineError(f"level must be 'parameter' or 'representation', got {level!r}.")
        head_grad = head_grad or self.default_head_grad
        if head_grad not in ("own", "weighted"):
            raise EngineError(f"head_grad must be 'own' or 'weighted', got {head_grad!r}.")
        self.level = level
        self.head_grad = head_grad
        self.engine = engine or GradientEngine()

    def weights(self, gram: Tensor, losses: Tensor, active: Tensor) -> Tensor:
        """float64 weights (K,) from the float64 Gramian; inactive tasks must get weight 0."""
        raise NotImplementedError

    def _solve(
        self, gram: Tensor, stacked: Tensor, active: Tensor, names: list[str], loss_scale: float | None
    ) -> Tensor:
        if not bool(torch.isfinite(gram).all()):
            if loss_scale is not None:  # fp16 overflow: NaN weights make the GradScaler skip the step
                return torch.full((len(names),), float("nan"), dtype=torch.float64, device=gram.device)
            bad = [n for n, ok in zip(names, torch.isfinite(gram.diagonal()).tolist(), strict=True) if not ok]
            raise NonFiniteGradientError(
                f"Non-finite gradient for task(s) {bad or names} although the losses are finite; "
                "nothing was updated. Lower the learning rate or clip the inputs."
            )
        return self.weights(gram, stacked, active)

    def backward(self, losses, shared=None, features=None, task_specific=None, loss_scale=None) -> StepInfo:
        names, values, labelled, stacked = self._prepare(losses, loss_scale)
        active = self._active(values, labelled)
        if self.level == "representation":
            if features is None:
                raise EngineError(
                    f"{type(self).__name__}(level='representation') needs features= (the shared "
                    "representation, e.g. model.last_features)."
                )
            gram, rep = self.engine.representation_gramian(values, features, names, task_specific)
            gram = unscale_gramian(gram, loss_scale)
            w = self._solve(gram, stacked, active, names, loss_scale)
            rep.backward_shared(w)
            rep.write_heads(w if self.head_grad == "weighted" else None)
        else:
            shared = as_param_list(shared)
            gram, jac = self.engine.parameter_gramian(values, shared, names, task_specific)
            gram = unscale_gramian(gram, loss_scale)
            w = self._solve(gram, stacked, active, names, loss_scale)
            jac.write_shared_weighted(w)
            jac.write_heads(w if self.head_grad == "weighted" else None)
        norms, cos = gradient_statistics(gram)
        return StepInfo(
            names, w.detach(), stacked, level=self.level, grad_norms=norms, cosines=cos, gramian=gram
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(level={self.level!r}, head_grad={self.head_grad!r})"
