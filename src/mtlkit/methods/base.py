"""The multi-task method interface shared by every loss weighting and gradient aggregator.

``method.backward(losses, model) -> StepInfo`` fills ``.grad`` of every parameter (accumulating,
like ``Tensor.backward``): shared parameters get the method's combined direction, task-specific
parameters their own task's gradient or the weighted one.

A method is an ``nn.Module``. Its hyper-parameters are declared once in the class body with
:func:`~mtlkit.methods.hparams.hparam` (constructor, validation, ``repr`` and configuration come
from there); its state lives in buffers, parameters and the module's extra state, so
``state_dict()``, ``load_state_dict()`` and ``.to()`` work as for any module, a saved state never
aliases the live one, and a state saved under another configuration or task set is refused.

The bases own everything but the mathematics: checking the losses (scalars, finite), masking tasks
without a labelled sample, unscaling under a ``GradScaler``, writing ``.grad``, statistics and the
lifecycle guards. A subclass implements one function of its family:

- :class:`LossWeighting` -- ``loss_weights(losses, active)``; one backward of ``sum_k w_k L_k``;
- :class:`GramianWeighting` -- ``weights(gramian, losses)`` on the Gramian of the tasks that have
  a label in the batch; the engine computes it at the parameter or representation level and the
  base combines ``J^T w``;
- :class:`JacobianAggregator` -- ``direction(jacobian)`` from the per-task gradient rows.

Lifecycle (run by the Trainer or :class:`~mtlkit.methods.Driver`; enforced, never optional):
``setup(tasks, model)`` once before the optimiser is built (then ``param_groups()`` into the
optimiser); per step ``backward`` and, for methods with the :attr:`Hook.AFTER_STEP` hook,
``after_step(losses after the optimiser step)``; per epoch ``begin_epoch()`` and
``on_epoch_end()``. A skipped call raises :class:`~mtlkit.errors.LifecycleError` on the next step.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from mtlkit.core.contract import MultiTaskOutput, shared_parameters, task_parameters
from mtlkit.core.engine import GradientEngine, HeadGrad, TaskParams, as_param_list
from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import (
    CheckpointError,
    ConfigError,
    EngineError,
    LifecycleError,
    NonFiniteGradientError,
    NonFiniteLossError,
    NonPositiveLossError,
    TaskError,
)
from mtlkit.methods.hparams import HParam, as_config_value, collect, hparam, instance_of, one_of, validate

Level = Literal["parameter", "representation"]
Losses = Mapping[str, Tensor] | Sequence[Tensor]


class Hook(enum.Enum):
    """Lifecycle calls a method may depend on; a method has a hook when it overrides the method
    named by the value."""

    #: ``after_step(losses)`` with the losses recomputed on the same batch after the optimiser step.
    AFTER_STEP = "_after_step"
    #: ``on_epoch_end()`` at the end of every epoch (and ``begin_epoch()`` at its start).
    EPOCH_END = "_epoch_end"


@dataclass
class StepInfo:
    """What a method did in one step. Tensors are detached and stay on the device (no host sync).

    Attributes:
        task_names: task order of every vector and matrix below.
        weights: effective weight of each task's loss in the shared update (``d = J^T w``);
            ``None`` for aggregators whose direction is not a combination of the task gradients.
        losses: the task losses seen by the method (unscaled).
        grad_norms: per-task gradient norms (when per-task gradients were computed).
        cosines: K x K pairwise cosine similarities of the task gradients (idem).
        gramian: the float64 Gramian the weights were computed from (idem).
        level: ``"loss"``, ``"parameter"`` or ``"representation"``.
    """

    task_names: list[str]
    weights: Tensor | None
    losses: Tensor
    level: str = "loss"
    grad_norms: Tensor | None = None
    cosines: Tensor | None = None
    gramian: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        """Flat ``{name: float}`` for logging (this is where the host sync happens)."""
        out: dict[str, float] = {}
        losses = self.losses.detach().float().cpu().tolist()
        for i, name in enumerate(self.task_names):
            out[f"loss/{name}"] = losses[i]
        if self.weights is not None:
            w = self.weights.detach().float().cpu().tolist()
            for i, name in enumerate(self.task_names):
                out[f"weight/{name}"] = w[i]
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


@dataclass
class StepInputs:
    """The checked inputs of one step, as the family bases pass them around.

    Attributes:
        names: task names, in order.
        values: the scalar losses as given (scaled under a GradScaler), attached to the graph.
        losses: (K,) detached, unscaled losses in at least float32.
        active: (K,) bool: the task had a labelled sample and its loss is attached to the graph.
        loss_scale: the GradScaler scale the losses carry, or ``None``.
        shared: the shared parameters (empty when neither a model nor ``shared=`` was given).
        task_specific: the task-specific parameters (``None``: found from the autograd graph).
        output: the model's :class:`~mtlkit.core.contract.MultiTaskOutput`, when given.
    """

    names: list[str]
    values: list[Tensor]
    losses: Tensor
    active: Tensor
    loss_scale: float | None
    shared: list[Tensor]
    task_specific: TaskParams
    output: MultiTaskOutput | None

    @property
    def scale(self) -> float:
        return 1.0 if self.loss_scale is None else float(self.loss_scale)


def state_copy(obj: Any) -> Any:
    """``obj`` (a tensor, ``None``, or a dict/list/tuple of them and plain values) with every
    tensor detached and cloned to the CPU, so a saved state never aliases the live one."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: state_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(state_copy(v) for v in obj)
    return obj


def gradient_statistics(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Per-task gradient norms and pairwise cosines from a Gramian (zero norms give cosine 0)."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))
    return norms, cos


def as_task_set(tasks: TaskSet | Sequence[Task] | Sequence[str]) -> TaskSet:
    if isinstance(tasks, TaskSet):
        return tasks
    items = list(tasks)
    if items and all(isinstance(t, Task) for t in items):
        return TaskSet(items)  # type: ignore[arg-type]
    return TaskSet([Task(str(t)) for t in items])


class Method(nn.Module):
    """Base class of every multi-task optimisation method (see the module docstring)."""

    #: Lifecycle hooks this method depends on (derived from the overridden hook methods).
    hooks: ClassVar[frozenset[Hook]] = frozenset()
    #: The method creates learnable parameters or binds model parts in :meth:`setup`, so a caller
    #: must call it (and add :meth:`param_groups` to the optimiser) before the first step.
    needs_setup: ClassVar[bool] = False
    #: The method reads ``Task(weight=...)`` (linear scalarisation); for every other method a task
    #: weight other than 1 is refused instead of being silently ignored.
    uses_task_weights: ClassVar[bool] = False
    #: Every active task's (unscaled) loss must be > 0 (methods that take logarithms of losses).
    positive_losses: ClassVar[bool] = False
    _hparams: ClassVar[dict[str, HParam]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._hparams = collect(cls)
        cls.hooks = frozenset(h for h in Hook if getattr(cls, h.value) is not getattr(Method, h.value))
        params = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=spec.default)
            for name, spec in cls._hparams.items()
        ]
        cls.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]

    def __init__(self, **options: Any) -> None:
        super().__init__()
        for name, value in validate(type(self).__name__, self._hparams, options).items():
            self.__dict__[name] = value  # plain attributes: a module given as an option is not a child
        self.task_names: list[str] | None = None
        self._after_step_due = False
        self._epoch_open = False
        self._stepped = False
        self._validate()

    def _validate(self) -> None:
        """Checks across hyper-parameters (override as needed; raise ConfigError)."""

    # -- configuration ------------------------------------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        """Every declared hyper-parameter's current value."""
        return {name: getattr(self, name) for name in self._hparams}

    def config(self) -> dict[str, Any]:
        """The configuration hyper-parameters as JSON-friendly values (``run.json``, checkpoints)."""
        return {n: as_config_value(getattr(self, n)) for n, spec in self._hparams.items() if spec.config}

    def __repr__(self) -> str:
        changed = [
            f"{n}={getattr(self, n)!r}"
            for n, spec in self._hparams.items()
            if spec.config and not _same(getattr(self, n), spec.default)
        ]
        return f"{type(self).__name__}({', '.join(changed)})"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"Call {type(self).__name__}.backward(losses, model), not the method object.")

    # -- lifecycle -----------------------------------------------------------------------------------
    def setup(self, tasks: TaskSet | Sequence[Task] | Sequence[str], model: nn.Module | None = None) -> None:
        """Bind the method to its tasks (and optionally the model) before training.

        Methods with learnable parameters create them here; call :meth:`param_groups` afterwards
        for the optimiser. Later calls with the same tasks only bind a model; a different task
        list raises.
        """
        task_set = as_task_set(tasks)
        names = task_set.names
        if self.task_names is None:
            if not self.uses_task_weights and any(w != 1.0 for w in task_set.weights):
                weighted = {t.name: t.weight for t in task_set if t.weight != 1.0}
                raise ConfigError(
                    f"Task weights {weighted} apply only to linear scalarisation ('ew'); "
                    f"{type(self).__name__} would ignore them. Remove them or use method 'ew'."
                )
            self._build(task_set)
            self.task_names = names
        elif names != self.task_names:
            raise TaskError(
                f"{type(self).__name__} was first used with tasks {self.task_names}; now it got "
                f"{names}. Use one method object per task set (and the same task order)."
            )
        if model is not None:
            self._attach(model)

    def _build(self, tasks: TaskSet) -> None:
        """Create per-task state (buffers, parameters) once the tasks are known."""

    def _attach(self, model: nn.Module) -> None:
        """Take what the method needs from the model (e.g. GradNorm's layer)."""

    def begin_epoch(self) -> None:
        """Start an epoch (methods with the epoch hook refuse steps outside an epoch)."""
        if self._epoch_open and Hook.EPOCH_END in self.hooks:
            raise LifecycleError(
                f"{type(self).__name__}.begin_epoch() was called again without on_epoch_end(): the "
                "previous epoch was never ended, so its epoch statistics were never used."
            )
        self._epoch_open = True

    def on_epoch_end(self) -> None:
        """End the epoch: run the method's epoch hook (DWA's ratios, STCH's nadir, ...)."""
        if Hook.EPOCH_END in self.hooks and not self._epoch_open:
            raise LifecycleError(
                f"{type(self).__name__}.on_epoch_end() without begin_epoch(): call begin_epoch() at "
                "the start of every epoch (or use mtlkit.methods.Driver / the Trainer)."
            )
        self._epoch_open = False
        self._epoch_end()

    def _epoch_end(self) -> None:
        """The epoch hook (override to depend on epochs)."""

    def after_step(self, new_losses: Losses) -> None:
        """Give the method the losses recomputed on the same batch after the optimiser step (under
        ``torch.no_grad()``); required for methods with the :attr:`Hook.AFTER_STEP` hook."""
        if Hook.AFTER_STEP not in self.hooks:
            return
        if not self._after_step_due:
            raise LifecycleError(f"{type(self).__name__}.after_step() needs a preceding backward().")
        names, values, labelled = self._split(new_losses)
        if self.task_names is not None and names != self.task_names:
            raise TaskError(
                f"{type(self).__name__}.after_step() got tasks {names}, expected {self.task_names}."
            )
        after = torch.stack([torch.as_tensor(v).detach().reshape(()) for v in values]).float()
        if not bool(torch.isfinite(after).all()):
            raise NonFiniteLossError(
                f"{type(self).__name__}.after_step() got non-finite losses {after.tolist()}; "
                "the method's state was not updated."
            )
        active = torch.ones_like(after, dtype=torch.bool)
        if labelled is not None:
            active = labelled.to(after.device) > 0
        self._after_step(after, active)
        self._after_step_due = False

    def _after_step(self, losses: Tensor, active: Tensor) -> None:
        """The post-step hook: detached unscaled losses after the optimiser step (override)."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups for the method's own parameters: no weight decay, and the
        method's own learning rate when it has one (``optimizer.add_param_group(g)`` for each)."""
        params = list(self.parameters())
        if not params:
            return []
        group: dict[str, Any] = {"params": params, "weight_decay": 0.0}
        lr = self.parameter_lr()
        if lr is not None:
            group["lr"] = lr
        return [group]

    def parameter_lr(self) -> float | None:
        """Learning rate of the method's own parameters (``None``: the optimiser's default)."""
        return None

    # -- the step ------------------------------------------------------------------------------------
    def backward(
        self,
        losses: Losses,
        model: nn.Module | None = None,
        output: MultiTaskOutput | None = None,
        *,
        shared: Iterable[Tensor] | None = None,
        loss_scale: float | None = None,
    ) -> StepInfo:
        """Fill ``.grad`` of every parameter from the task losses; return what was done.

        Args:
            losses: ``{task: scalar loss}`` (a :class:`~mtlkit.core.tasks.TaskLosses` also tells
                which tasks had no labelled sample) or a sequence of scalar losses in task order.
            model: the multi-task model (also inside a DDP wrapper): its ``shared_parameters()``
                and ``task_parameters()`` say what is shared.
            output: the model's ``MultiTaskOutput`` (``model(x, full_output=True)``): the shared
                representation for representation-level methods, and auxiliary losses, which
                are back-propagated with weight 1.
            shared: the shared parameters, instead of a model (task-specific parameters are then
                found from the autograd graph).
            loss_scale: set when the losses were multiplied by a ``GradScaler`` scale: the method
                works on unscaled losses and gradients, and leaves ``.grad`` scaled for
                ``scaler.unscale_``.
        """
        inputs = self._begin_step(losses, model, output, shared, loss_scale)
        aux = output.aux_losses if output is not None else None
        if aux:
            total = torch.stack([v.reshape(()) for v in aux.values()]).sum()
            if total.requires_grad:  # before the method's backward, which may free the graph
                torch.autograd.backward(total, retain_graph=True)
        info = self._step(inputs)
        self._stepped = True
        self._after_step_due = Hook.AFTER_STEP in self.hooks
        return info

    def _step(self, inputs: StepInputs) -> StepInfo:
        raise NotImplementedError

    def _split(self, losses: Losses) -> tuple[list[str], list[Tensor], Tensor | None]:
        if isinstance(losses, Mapping):
            return list(losses), list(losses.values()), getattr(losses, "labelled", None)
        values = list(losses)
        # positional losses take the bound task names when the count fits, else "0", "1", ...
        same = self.task_names is not None and len(self.task_names) == len(values)
        return (list(self.task_names) if same else [str(i) for i in range(len(values))]), values, None  # type: ignore[arg-type]

    def _begin_step(
        self,
        losses: Losses,
        model: nn.Module | None,
        output: MultiTaskOutput | None,
        shared: Iterable[Tensor] | None,
        loss_scale: float | None,
    ) -> StepInputs:
        """Check everything before anything is written: losses, lifecycle, configuration."""
        names, values, labelled = self._split(losses)
        if not values:
            raise TaskError(f"{type(self).__name__}.backward() got no task losses.")
        for n, v in zip(names, values, strict=True):
            if not isinstance(v, Tensor) or v.numel() != 1:
                raise TaskError(
                    f"Task {n!r}: a loss must be a scalar tensor, got "
                    f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}."
                )
        values = [v.reshape(()) for v in values]
        self._check_lifecycle(names)
        stacked = torch.stack([v.detach() for v in values])
        stacked = stacked.to(torch.promote_types(stacked.dtype, torch.float32))
        if loss_scale is not None:
            stacked = stacked / loss_scale
        finite = torch.isfinite(stacked)
        if not bool(finite.all()):
            bad = [n for n, ok in zip(names, finite.tolist(), strict=True) if not ok]
            raise NonFiniteLossError(
                f"Non-finite loss for task(s) {bad} (values {stacked.tolist()}); nothing was updated. "
                "Check the inputs and targets of these tasks, or lower the learning rate."
            )
        active = torch.tensor([v.requires_grad for v in values], device=stacked.device)
        if labelled is not None:
            active = active & (labelled.to(stacked.device) > 0)
        if self.positive_losses:
            self._require_positive(names, stacked, active)
        if model is not None:
            shared_list = as_param_list(shared_parameters(model))
            specific: TaskParams = task_parameters(model)
        else:
            shared_list, specific = as_param_list(shared), None
        return StepInputs(names, values, stacked, active, loss_scale, shared_list, specific, output)

    def _check_lifecycle(self, names: list[str]) -> None:
        if self.task_names is None:
            if self.needs_setup:
                raise LifecycleError(
                    f"{type(self).__name__} must be set up before training: call "
                    "method.setup(tasks, model=model), then add method.param_groups() to the "
                    "optimiser (mtlkit.methods.Driver and the Trainer do both)."
                )
            self.setup(names)
        elif names != self.task_names:
            raise TaskError(
                f"{type(self).__name__} was set up for tasks {self.task_names}; this step has {names}."
            )
        if self._after_step_due:
            raise LifecycleError(
                f"{type(self).__name__}.after_step(losses) was not called after the last step: it "
                "needs the losses recomputed on the same batch after optimizer.step() (use "
                "mtlkit.methods.Driver, or call it yourself)."
            )
        if Hook.EPOCH_END in self.hooks and not self._epoch_open:
            raise LifecycleError(
                f"{type(self).__name__} depends on epoch boundaries: call method.begin_epoch() at the "
                "start and method.on_epoch_end() at the end of every epoch (mtlkit.methods.Driver "
                "and the Trainer do)."
            )
        if self._stepped:
            for name, p in self.named_parameters():
                if p.grad is not None and bool(p.grad.ne(0).any()):
                    raise LifecycleError(
                        f"{type(self).__name__}'s parameter {name!r} still holds the gradient of the "
                        "previous step: it is in no optimiser (add method.param_groups() to it) or "
                        "its gradient was not zeroed."
                    )

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

    # -- state ---------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "method": type(self).__name__,
            "config": self.config(),
            "task_names": list(self.task_names) if self.task_names is not None else None,
            "extra": state_copy(self._extra_state()),
        }

    def set_extra_state(self, state: Any) -> None:
        self._load_extra_state(state_copy(state.get("extra") or {}))

    def _extra_state(self) -> dict[str, Any]:
        """Non-tensor state (counters, generator states) for the checkpoint (override)."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_state` returned (a private copy)."""

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        before = set(destination)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key in set(destination) - before:  # copies: later in-place updates never reach a saved state
            if isinstance(destination[key], Tensor) and not keep_vars:
                destination[key] = destination[key].clone()

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load a state saved by the same method class, configuration and task set; anything
        else raises before the method is changed."""
        extra = state_dict.get("_extra_state")
        if not isinstance(extra, Mapping):
            raise CheckpointError(f"This is not a saved {type(self).__name__} state (no '_extra_state').")
        if extra.get("method") != type(self).__name__ or extra.get("config") != self.config():
            raise CheckpointError(
                f"The state was saved by {extra.get('method')} with {extra.get('config')}; this is "
                f"{type(self).__name__} with {self.config()}. Use the same method and options to resume."
            )
        names = extra.get("task_names")
        if names is not None:
            if self.task_names is None:
                self.setup(list(names))
            elif list(names) != self.task_names:
                raise TaskError(
                    f"This {type(self).__name__} state was saved for tasks {list(names)}, not {self.task_names}."
                )
        self._after_step_due = False
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except (TypeError, ValueError, RuntimeError):
        return a is b


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
        self.after_backward(inputs)
        return StepInfo(
            inputs.names, weights.detach(), inputs.losses, level="loss", extras=self.step_extras()
        )


class GradientMethod(Method):
    """Shared options of the methods that need per-task gradients from the engine."""

    level: Level = hparam(
        "parameter",
        one_of("parameter", "representation"),
        "where the task gradients are taken: the shared parameters, or the shared representation",
    )
    head_grad: HeadGrad = hparam(
        "weighted",
        one_of("own", "weighted"),
        "task-specific parameters get their own or the weighted gradient",
    )
    engine: GradientEngine | None = hparam(
        None, instance_of(GradientEngine) | one_of(None), "the gradient engine", config=False
    )

    def _engine(self) -> GradientEngine:
        if self.engine is None:
            self.__dict__["engine"] = GradientEngine()
        return self.engine  # type: ignore[return-value]

    def _representation(self, inputs: StepInputs) -> Any:
        rep = inputs.output.representation if inputs.output is not None else None
        if rep is None:
            raise EngineError(
                f"{type(self).__name__}(level='representation') needs the shared representation: pass "
                "output=model(x, full_output=True) to backward()."
            )
        return rep

    def _shared(self, inputs: StepInputs) -> list[Tensor]:
        if not inputs.shared:
            raise EngineError(
                f"{type(self).__name__} needs the shared parameters: pass the model (or shared=) to backward()."
            )
        return inputs.shared


def active_subset(active: Tensor) -> Tensor | None:
    """Indices of the active tasks (a host sync), or ``None`` when every task is active."""
    flags = active.detach().cpu()
    return None if bool(flags.all()) else flags.nonzero().squeeze(1)


class GramianWeighting(GradientMethod):
    """A method whose shared direction is ``J^T w`` with ``w = f(G)`` (G = J J^T).

    Subclasses implement :meth:`weights` on the Gramian of the active tasks (those with a labelled
    sample); tasks without one get weight 0. During the call ``self.active_index`` holds the
    indices of those tasks in the task list (for methods with per-task state, e.g. a warm start).
    """

    active_index: Tensor | None = None

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """float64 weights (A,) from the float64 A x A Gramian of the active tasks and their
        unscaled losses."""
        raise NotImplementedError

    def _solve(self, gram: Tensor, inputs: StepInputs) -> Tensor:
        names = inputs.names
        if not bool(torch.isfinite(gram).all()):
            if inputs.loss_scale is not None:  # fp16 overflow: NaN weights make the GradScaler skip
                return torch.full((len(names),), float("nan"), dtype=torch.float64, device=gram.device)
            bad = [n for n, ok in zip(names, torch.isfinite(gram.diagonal()).tolist(), strict=True) if not ok]
            raise NonFiniteGradientError(
                f"Non-finite gradient for task(s) {bad or names} although the losses are finite; "
                "nothing was updated. Lower the learning rate or clip the inputs."
            )
        idx = active_subset(inputs.active)
        losses = inputs.losses.to(gram.device, torch.float64)
        try:
            if idx is None:
                self.active_index = torch.arange(len(names))
                return self.weights(gram, losses).to(torch.float64)
            w = torch.zeros(len(names), dtype=torch.float64, device=gram.device)
            if len(idx):
                self.active_index = idx
                sub = idx.to(gram.device)
                w[sub] = self.weights(gram[sub][:, sub], losses[sub]).to(torch.float64)
            return w
        finally:
            self.active_index = None  # valid during the call only

    def _step(self, inputs: StepInputs) -> StepInfo:
        engine = self._engine()
        own = self.head_grad == "own"
        if self.level == "representation":
            gram, rep = engine.representation_gramian(
                inputs.values, self._representation(inputs), inputs.names, inputs.task_specific
            )
            gram = gram / inputs.scale**2
            w = self._solve(gram, inputs)
            rep.backward_shared(w)
            rep.write_heads(None if own else w)
        else:
            gram, jac = engine.parameter_gramian(inputs.values, self._shared(inputs), inputs.task_specific)
            gram = gram / inputs.scale**2
            w = self._solve(gram, inputs)
            jac.write_shared_weighted(w)
            jac.write_heads(None if own else w)
        norms, cos = gradient_statistics(gram)
        return StepInfo(
            inputs.names,
            w.detach(),
            inputs.losses,
            level=self.level,
            grad_norms=norms,
            cosines=cos,
            gramian=gram,
        )


class JacobianAggregator(GradientMethod):
    """A method that needs the per-task gradients themselves: ``d = direction(J)``.

    Subclasses implement :meth:`direction` on the A x d matrix of the active tasks' gradient rows
    (unscaled; at the parameter level d is the number of shared parameters). The rows live in the
    engine's reused buffer and are valid during the call only; a method that keeps gradients
    across steps (GradVac, MoCo) sets ``keeps_gradients = True`` and then receives rows it owns.
    Task-specific parameters get their own gradient by default.
    """

    head_grad: HeadGrad = hparam(
        "own", one_of("own", "weighted"), "task-specific parameters get their own or the weighted gradient"
    )
    level: Level = hparam("parameter", one_of("parameter"), "per-task gradients of the shared parameters")
    keeps_gradients: ClassVar[bool] = False
    active_index: Tensor | None = None

    def direction(self, jacobian: Tensor) -> Tensor:
        """The shared update direction (d,) from the (A, d) unscaled task gradients."""
        raise NotImplementedError

    def _step(self, inputs: StepInputs) -> StepInfo:
        jac = self._engine().jacobian(
            inputs.values, self._shared(inputs), inputs.task_specific, owned=self.keeps_gradients
        )
        rows = jac.rows()
        idx = active_subset(inputs.active)
        self.active_index = torch.arange(len(inputs.names)) if idx is None else idx
        active_rows = rows if idx is None else rows[idx.to(rows.device)]
        if inputs.loss_scale is not None:
            active_rows = active_rows / inputs.scale
        try:
            direction = self.direction(active_rows)
        finally:
            self.active_index = None
        if not bool(torch.isfinite(direction).all()) and inputs.loss_scale is None:
            raise NonFiniteGradientError(
                f"{type(self).__name__} produced a non-finite direction; nothing was updated."
            )
        jac.write_shared_flat(direction * inputs.scale)
        weights = inputs.active.to(torch.float64)
        jac.write_heads(None if self.head_grad == "own" else weights)
        norms = torch.linalg.vector_norm(rows.double(), dim=1) / inputs.scale
        return StepInfo(inputs.names, None, inputs.losses, level="parameter", grad_norms=norms)
