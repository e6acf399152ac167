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

- :class:`~mtlkit.methods.loss_weighting.LossWeighting` -- ``loss_weights(losses, active)``; one
  backward of ``sum_k w_k L_k``;
- :class:`~mtlkit.methods.gradient_methods.GramianWeighting` -- ``weights(gramian, losses)`` on the
  Gramian of the tasks that have a label in the batch; the engine computes it at the parameter or
  representation level and the base combines ``J^T w``;
- :class:`~mtlkit.methods.gradient_methods.JacobianAggregator` -- ``direction(jacobian)`` from the
  per-task gradient rows.

Lifecycle (run by the Trainer or :class:`~mtlkit.methods.Driver`; enforced, never optional):
``setup(tasks, model)`` once before the optimiser is built (then ``param_groups()`` into the
optimiser); per step ``backward`` and, for methods with the :attr:`Hook.AFTER_STEP` hook,
``after_step(losses after the optimiser step)``; per epoch ``begin_epoch()`` and
``on_epoch_end()``. A skipped call raises :class:`~mtlkit.errors.LifecycleError` on the next step.
"""

from __future__ import annotations

import enum
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtlkit.core.contract import MultiTaskOutput, shared_parameters, task_parameters, unwrap
from mtlkit.core.distributed import DataParallel
from mtlkit.core.engine import TaskParams, as_param_list, reachable_leaves
from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import (
    CheckpointError,
    ConfigError,
    DistributedError,
    LifecycleError,
    NonFiniteLossError,
    NonPositiveLossError,
    TaskError,
)
from mtlkit.methods.hparams import HParam, as_config_value, collect, validate

Losses = Mapping[str, Tensor] | Sequence[Tensor]
#: ``closure() -> (losses, output)``: the model run again on the step's batch (see ``needs_closure``)
Closure = Callable[[], tuple[Losses, MultiTaskOutput | None]]


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
        aux_losses: the model's auxiliary losses (detached), added to the update with weight 1.
    """

    task_names: list[str]
    weights: Tensor | None
    losses: Tensor
    level: str = "loss"
    grad_norms: Tensor | None = None
    cosines: Tensor | None = None
    gramian: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    aux_losses: dict[str, Tensor] | None = None

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
        for name, value in (self.aux_losses or {}).items():
            out[f"aux/{name}"] = float(value)
        return out


class StepInputs:
    """The checked inputs of one step, as the family bases pass them around.

    Attributes:
        names: task names, in order.
        values: the scalar losses as given (scaled under a GradScaler), attached to the graph.
        losses: (K,) detached, unscaled losses in at least float32.
        active: (K,) bool: the task had a labelled sample and its loss is attached to the graph.
        loss_scale: the GradScaler scale the losses carry, or ``None``.
        output: the model's :class:`~mtlkit.core.contract.MultiTaskOutput`, when given.
        shared: the shared parameters (empty when neither a model nor ``shared=`` was given);
            read from the model on first use, so loss weightings never pay for it.
        task_specific: the task-specific parameters (``None``: found from the autograd graph).
        parallel: the data-parallel context under DDP (``None`` in one process): ``losses`` and
            ``active`` are then global and each of ``values`` is the rank's loss times its share
            (:mod:`mtlkit.core.distributed`).
    """

    def __init__(
        self,
        names: list[str],
        values: list[Tensor],
        losses: Tensor,
        active: Tensor,
        loss_scale: float | None,
        model: nn.Module | None,
        shared: Iterable[Tensor] | None,
        output: MultiTaskOutput | None,
    ) -> None:
        self.names, self.values, self.losses, self.active = names, values, losses, active
        self.loss_scale, self.output = loss_scale, output
        self._model, self._shared = model, shared
        #: the inputs of the step's other batches, for methods with ``batches_per_step > 1``
        self.extra: list[StepInputs] = []
        #: positions of these tasks in the method's task list (``None``: all, in order)
        self.index: Tensor | None = None
        #: re-evaluates the losses on the step's batch (methods with ``needs_closure``)
        self.closure: Closure | None = None
        self.parallel: DataParallel | None = None
        #: under DDP, the factors ``R c_rk / C_k`` that ``values`` carry (a loss recomputed on the
        #: same batch, e.g. by the closure, needs them too); ``None`` in one process
        self.shares: Tensor | None = None

    def after_reduce(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the step's gradients are averaged across ranks (now, in one process or
        when DDP's own reducer already averaged them): a clip of the shared gradient must see the
        global gradient."""
        if self.parallel is None or self.parallel.native:
            fn()
        else:
            self.parallel.deferred.append(fn)

    def average_now(self, tensors: Sequence[Tensor], written: Iterable[Tensor]) -> None:
        """Under DDP, average ``tensors`` across ranks now, and note that the gradients of
        ``written`` that the step derives from them are global, so the step's final reduction skips
        them (nothing in one process)."""
        if self.parallel is not None:
            self.parallel.average_(tensors)
            self.parallel.reduced.update(id(p) for p in written)

    def subset(self, index: Tensor) -> StepInputs:
        """The inputs of the tasks at ``index`` only (a sorted 1-D index into the task list)."""
        keep = [int(i) for i in index]
        names = [self.names[i] for i in keep]
        rep = self.output.representation if self.output is not None else None
        output = self.output
        if isinstance(rep, Mapping):
            output = MultiTaskOutput(
                {n: self.output.predictions[n] for n in names} if self.output is not None else {},
                {n: rep[n] for n in names},
            )
        sub = StepInputs(
            names,
            [self.values[i] for i in keep],
            self.losses[index.to(self.losses.device)],
            self.active[index.to(self.active.device)],
            self.loss_scale,
            self._model,
            self._shared,
            output,
        )
        sub.parallel = self.parallel
        sub.shares = self.shares[index.to(self.shares.device)] if self.shares is not None else None
        spec = self.task_specific
        sub.__dict__["task_specific"] = (
            {n: v for n, v in spec.items() if n in set(names)} if isinstance(spec, Mapping) else spec
        )
        sub.index = index
        return sub

    @functools.cached_property
    def shared(self) -> list[Tensor]:
        if self._model is not None:
            return as_param_list(shared_parameters(self._model))
        return as_param_list(self._shared)

    @property
    def knows_shared(self) -> bool:
        """Whether the shared parameters were given (a model or ``shared=``); the list may still be
        empty, for a model with nothing shared (soft parameter sharing)."""
        return self._model is not None or self._shared is not None

    @functools.cached_property
    def task_specific(self) -> TaskParams:
        return task_parameters(self._model) if self._model is not None else None

    @property
    def scale(self) -> float:
        return 1.0 if self.loss_scale is None else float(self.loss_scale)


def gradients_of(total: Tensor, model: nn.Module | None) -> list[tuple[Tensor, Tensor]]:
    """``(parameter, d total / d parameter)`` for the model's trainable parameters (without a
    model: every leaf the graph reaches) that ``total`` reaches; the graph is kept, nothing is
    written."""
    if not total.requires_grad:
        return []
    params: list[Tensor]
    if model is not None:
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = [p for p in reachable_leaves([total], set()) if p.requires_grad]
    grads = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
    return [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]


def add_gradients(pairs: Iterable[tuple[Tensor, Tensor]]) -> None:
    """Accumulate ``(parameter, gradient)`` pairs into ``.grad`` (in the parameter's dtype)."""
    for p, g in pairs:
        g = g.to(p.dtype)
        p.grad = g if p.grad is None else p.grad.add_(g)


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


def as_task_set(tasks: TaskSet | Iterable[Task] | Iterable[str]) -> TaskSet:
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
    #: The method re-evaluates the losses on the step's batch at other weights (F-MTL's perturbed
    #: passes): ``backward`` needs ``closure=``, a callable that runs the model forward on the same
    #: batch and returns ``(losses, output)`` (scaled like the step's losses under a GradScaler).
    needs_closure: ClassVar[bool] = False
    #: What the model must provide beyond the contract (``None``: nothing), in words for errors
    #: and listings (FULLER: a gradient calibration where the modality branches meet).
    model_requirement: ClassVar[str | None] = None
    #: Under DDP the step is one backward through the wrapper, so DDP's own reducer averages the
    #: model's gradients (the loss weightings); every other method averages them itself.
    ddp_native: ClassVar[bool] = False
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
        self._versions: tuple[Any, int, list[int]] | None = None
        # the last step's data-parallel context, kept only until after_step reads it (a method that
        # holds a process group could not be copied)
        self._parallel: DataParallel | None = None
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
    def setup(self, tasks: TaskSet | Iterable[Task] | Iterable[str], model: nn.Module | None = None) -> None:
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
            self._build_family(task_set)
            self._build(task_set)
            self.task_names = names
        elif names != self.task_names:
            raise TaskError(
                f"{type(self).__name__} was first used with tasks {self.task_names}; now it got "
                f"{names}. Use one method object per task set (and the same task order)."
            )
        if model is not None:
            self._attach(model)

    def _build_family(self, tasks: TaskSet) -> None:
        """Per-task state that a family base keeps for all its methods (before :meth:`_build`)."""

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

    def abort_epoch(self) -> None:
        """Forget the open epoch without running the epoch hook (after an error inside it)."""
        self._epoch_open = False
        self._after_step_due = False

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
        parallel, self._parallel = self._parallel, None
        if parallel is not None:  # the same global losses on every rank, like the step's
            counts = labelled.to(after.device) if labelled is not None else torch.ones_like(after)
            after, active, _ = parallel.global_losses(after, counts)
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
        extra_losses: Sequence[Losses] = (),
        closure: Closure | None = None,
        data_parallel: DataParallel | None = None,
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
            extra_losses: for methods that use several independent batches per step
                (``batches_per_step > 1``: MoDo, SDMGrad with ``independent_batches``), the task
                losses of the other ``batches_per_step - 1`` batches (same model, same scale).
                The Trainer and the Driver's users draw them from the loader.
            closure: for methods with :attr:`needs_closure` (F-MTL): re-runs the forward pass on
                the step's batch and returns ``(losses, output)`` with the same scale as
                ``losses``. The Trainer passes it; in your own loop see
                :class:`~mtlkit.methods.Driver`.
            data_parallel: the data-parallel context; by default found from a
                ``DistributedDataParallel`` model with more than one rank. Under DDP the step is
                exact (the update of one process on the global batch): the method sees the global
                losses, its solve the global per-task information, and ``.grad`` ends averaged
                across ranks. Loss weightings run with DDP's reducer on; every other method must run
                the forward and this call inside ``with model.no_sync():`` and averages the gradients
                itself (the Trainer does both). See ``docs/distributed.md``.
        """
        if self.needs_closure and closure is None:
            raise LifecycleError(
                f"{type(self).__name__} re-evaluates the losses on the step's batch at perturbed "
                "weights: pass closure=, a callable that runs the model on the same batch and returns "
                "(losses, output) (the Trainer does this by itself)."
            )
        parallel = data_parallel if data_parallel is not None else self._data_parallel(model)
        self._parallel = parallel if Hook.AFTER_STEP in self.hooks else None
        inputs = self._begin_step(losses, model, output, shared, loss_scale, parallel)
        inputs.closure = closure
        inputs.extra = self._extra_inputs(extra_losses, model, shared, loss_scale, parallel)
        aux = self._aux_gradients(inputs, model)  # before the method's backward frees the graph
        info = self._dispatch(inputs)
        if inputs.output is not None and inputs.output.aux_losses:
            info.aux_losses = {k: v.detach() for k, v in inputs.output.aux_losses.items()}
        if parallel is not None and aux:
            parallel.average_([g for _, g in aux])  # local, on every rank for the same parameters
        add_gradients(aux)  # written only once the method's checks have passed
        if parallel is not None and parallel.reduce:
            self._average_step_gradients(parallel, model)
        self._remember_versions(inputs, model)
        self._after_step_due = Hook.AFTER_STEP in self.hooks
        return info

    def _data_parallel(self, model: nn.Module | None) -> DataParallel | None:
        parallel = DataParallel.of(model)
        if parallel is not None and parallel.native and not self.ddp_native:
            raise DistributedError(
                f"{type(self).__name__} combines per-task information across ranks and averages the "
                "gradients itself, but the DDP model's forward ran with gradient sync on: run the "
                "forward and method.backward() inside `with model.no_sync():` (the Trainer does). "
                "Only loss weightings use DDP's own reducer."
            )
        return parallel

    def _average_step_gradients(self, parallel: DataParallel, model: nn.Module | None) -> None:
        """Average what this step wrote across ranks (DDP's reducer did the model's part when
        native), then run what waited for the global gradient."""
        params: list[Tensor] = list(self.parameters())
        if not parallel.native and model is not None:
            params = list(unwrap(model).parameters()) + params
        parallel.average_gradients(params)
        for fn in parallel.deferred:
            fn()
        parallel.deferred.clear()

    @property
    def needs_representation(self) -> bool:
        """Whether a step reads the model's shared representation (``output.representation``):
        representation-level methods and Rep-MTL. Multi-input training, where each task reads
        its own inputs, has none."""
        return False

    @property
    def batches_per_step(self) -> int:
        """How many independent batches one step uses (the first one's losses are ``losses``,
        the others' ``extra_losses``)."""
        return 1

    def _extra_inputs(
        self,
        extra_losses: Sequence[Losses],
        model: nn.Module | None,
        shared: Iterable[Tensor] | None,
        loss_scale: float | None,
        parallel: DataParallel | None = None,
    ) -> list[StepInputs]:
        wanted = self.batches_per_step - 1
        if len(extra_losses) != wanted:
            raise LifecycleError(
                f"{type(self).__name__} uses {self.batches_per_step} independent batch(es) per step: "
                f"pass the losses of {wanted} more batch(es) as extra_losses= (got {len(extra_losses)}). "
                "The Trainer does this by itself."
            )
        out = []
        for losses in extra_losses:
            names, values, labelled = self._split(losses)
            if names != self.task_names:
                raise TaskError(f"extra_losses has tasks {names}; the step's tasks are {self.task_names}.")
            out.append(self._inputs(names, values, labelled, model, shared, None, loss_scale, parallel))
        return out

    def _aux_gradients(self, inputs: StepInputs, model: nn.Module | None) -> list[tuple[Tensor, Tensor]]:
        """Gradients of the model's auxiliary losses (weight 1, scaled like the task losses)."""
        aux = inputs.output.aux_losses if inputs.output is not None else None
        if not aux:
            return []
        values = torch.stack([v.reshape(()) for v in aux.values()])
        if not bool(torch.isfinite(values).all()):
            bad = [k for k, v in aux.items() if not bool(torch.isfinite(v).all())]
            raise NonFiniteLossError(
                f"The model's auxiliary loss(es) {bad} are not finite; nothing was updated."
            )
        return gradients_of(values.sum() * inputs.scale, model)

    def _remember_versions(self, inputs: StepInputs, model: nn.Module | None) -> None:
        """Note the version counters of the method's parameters and of one model parameter, so
        the next step can tell an optimiser step that skipped the method's parameters (an error)
        from gradient accumulation or a skipped GradScaler step (no optimiser step at all)."""
        own = list(self.parameters())
        if not own:
            return
        probe: Tensor | None = None
        if model is not None:
            probe = next((p for p in model.parameters() if p.requires_grad), None)
        if probe is None and inputs._shared is not None:
            probe = inputs.shared[0] if inputs.shared else None
        self._versions = (probe, probe._version if probe is not None else 0, [p._version for p in own])

    def _dispatch(self, inputs: StepInputs) -> StepInfo:
        """Route a step to :meth:`_step` (a family may first handle special cases)."""
        return self._step(inputs)

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
        parallel: DataParallel | None = None,
    ) -> StepInputs:
        """Check everything before anything is written: losses, lifecycle, configuration."""
        names, values, labelled = self._split(losses)
        if not values:
            raise TaskError(f"{type(self).__name__}.backward() got no task losses.")
        self._check_lifecycle(names)
        return self._inputs(names, values, labelled, model, shared, output, loss_scale, parallel)

    def _inputs(
        self,
        names: list[str],
        values: list[Tensor],
        labelled: Tensor | None,
        model: nn.Module | None,
        shared: Iterable[Tensor] | None,
        output: MultiTaskOutput | None,
        loss_scale: float | None,
        parallel: DataParallel | None = None,
    ) -> StepInputs:
        for n, v in zip(names, values, strict=True):
            if not isinstance(v, Tensor) or v.numel() != 1:
                raise TaskError(
                    f"Task {n!r}: a loss must be a scalar tensor, got "
                    f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}."
                )
        values = [v.reshape(()) for v in values]
        self._follow_device(values[0].device)
        stacked = torch.stack([v.detach() for v in values])
        stacked = stacked.to(torch.promote_types(stacked.dtype, torch.float32))
        if loss_scale is not None:
            stacked = stacked / loss_scale
        active = torch.tensor([v.requires_grad for v in values], device=stacked.device)
        if labelled is not None:
            active = active & (labelled.to(stacked.device) > 0)
        shares = None
        if parallel is not None:  # every rank checks the same global losses: all raise or none
            values, stacked, active, shares = _global_inputs(parallel, values, stacked, active, labelled)
        finite = torch.isfinite(stacked)
        if not bool(finite.all()):
            bad = [n for n, ok in zip(names, finite.tolist(), strict=True) if not ok]
            raise NonFiniteLossError(
                f"Non-finite loss for task(s) {bad} (values {stacked.tolist()}); nothing was updated. "
                "Check the inputs and targets of these tasks, or lower the learning rate."
            )
        if self.positive_losses:
            self._require_positive(names, stacked, active)
        inputs = StepInputs(names, values, stacked, active, loss_scale, model, shared, output)
        inputs.parallel, inputs.shares = parallel, shares
        return inputs

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
        versions = self._versions
        if versions is not None:
            probe, probe_version, own_versions = versions
            model_stepped = probe is None or probe._version != probe_version
            for (name, p), before in zip(self.named_parameters(), own_versions, strict=False):
                if not model_stepped or p._version != before or p.grad is None:
                    continue  # accumulating, a skipped step, or the optimiser updated it
                if bool(p.grad.ne(0).any()):
                    raise LifecycleError(
                        f"{type(self).__name__}'s parameter {name!r} was not updated by the last "
                        "optimiser step and still holds that step's gradient: it is in no optimiser "
                        "(add method.param_groups() to it)."
                    )

    def _follow_device(self, device: torch.device) -> None:
        """Move the method's state to the losses' device (in place for parameters, so an optimiser
        keeps its references) the first time they differ."""
        held = next(iter(self.buffers()), None)
        if held is None:
            held = next(iter(self.parameters()), None)
        if held is not None and held.device != device and held.device.type != "meta":
            self.to(device)

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
            "family": state_copy(self._family_state()),
        }

    def set_extra_state(self, state: Any) -> None:
        self._load_family_state(state_copy(state.get("family") or {}))
        self._load_extra_state(state_copy(state.get("extra") or {}))

    def _family_state(self) -> dict[str, Any]:
        """Non-tensor state kept by a family base (counters), beside the method's own."""
        return {}

    def _load_family_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_family_state` returned."""

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
        self.abort_epoch()  # a loaded state starts with no open epoch or pending post-step call
        self._versions = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except (TypeError, ValueError, RuntimeError):
        return a is b


def _global_inputs(
    parallel: DataParallel,
    values: list[Tensor],
    losses: Tensor,
    active: Tensor,
    labelled: Tensor | None,
) -> tuple[list[Tensor], Tensor, Tensor, Tensor | None]:
    """The global losses and active flags of a data-parallel step, this rank's losses times their
    shares (whose gradients, averaged over ranks, are the global batch's), and the shares."""
    if parallel.prepared is not None:  # inside another method's step: done there
        global_losses, global_active = parallel.prepared
        return values, global_losses.to(losses.device), global_active.to(losses.device), None
    counts = active.to(torch.float64)
    if labelled is not None:
        counts = counts * labelled.to(device=losses.device, dtype=torch.float64)
    global_losses, global_active, shares = parallel.global_losses(losses, counts)
    scaled = [v * s.to(device=v.device, dtype=v.dtype) for v, s in zip(values, shares.unbind(), strict=True)]
    return scaled, global_losses, global_active, shares
