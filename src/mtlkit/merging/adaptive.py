"""Merging coefficients learned on data at test time: AdaMerging and what it shares with the
other test-time-adaptation mergers (Concrete AdaMerging).

:class:`TaskVectorModel` holds the experts' architecture, ``theta_0`` and the task vectors of
every merged tensor, and builds the merged model functionally (``torch.func.functional_call``),
so coefficients (and masks) stay differentiable. :func:`adaptation_loss` is the objective on one
task's batch: the paper's prediction entropy, the experts' own predictions as pseudo-labels, or
the true labels (a supervised control, never the paper's method).

Test-time data: these methods read *unlabelled inputs* of each task (the papers take them from
the test split, transductively). Give them a split of their own (a validation split in our
benchmarks) and keep the test split for scoring.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mtlkit.errors import ConfigError, NonFiniteLossError, ShapeMismatchError, unknown_name
from mtlkit.merging.base import Loader, Merger, register

#: what the coefficients are fitted to (``labels`` is a supervised control, not AdaMerging)
OBJECTIVES = ("entropy", "expert_labels", "labels")
#: one coefficient per task (``task``) or per task and merged tensor (``layer``)
GRANULARITIES = ("task", "layer")


def task_logits(output: Any, task: str) -> Tensor:
    """Task ``task``'s logits in a model's output: the output itself, or its entry ``task``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and task in output:
        return output[task]
    keys = sorted(output) if isinstance(output, dict) else type(output).__name__
    raise ShapeMismatchError(
        f"The model's output has no logits for task {task!r} (got {keys}); return a tensor, or a dict "
        "keyed by the experts' names."
    )


def entropy(logits: Tensor) -> Tensor:
    """The batch mean of the prediction entropy ``-sum_c p_c log(p_c + 1e-8)`` (AdaMerging's loss)."""
    p = torch.softmax(logits, dim=-1)
    return -(p * torch.log(p + 1e-8)).sum(-1).mean()


def adaptation_loss(objective: str, logits: Tensor, target: Tensor | None) -> Tensor:
    """One task's loss: ``entropy`` (no target), ``expert_labels`` or ``labels`` (cross-entropy
    against the target classes)."""
    if objective == "entropy":
        return entropy(logits)
    assert target is not None
    return F.cross_entropy(logits, target)


class TaskVectorModel:
    """``theta_0`` and the task vectors of ``names`` (float32), and the merged model's forward.

    ``template`` is an instance of the experts' architecture (kept in eval mode; its own weights
    are never read for the merged tensors). Tensors of the state not in ``names`` (integer
    counters, statistics a ``batchnorm`` rule handles) take ``theta_0``'s values.
    """

    def __init__(
        self, template: nn.Module, names: Sequence[str], pretrained: Loader, experts: Sequence[Loader]
    ):
        self.template = copy.deepcopy(template).eval()
        for p in self.template.parameters():
            p.requires_grad_(False)
        self.names = list(names)
        state = self.template.state_dict()
        unknown = [n for n in self.names if n not in state]
        if unknown:
            raise ShapeMismatchError(f"The model has no tensors {unknown[:5]} of the checkpoints.")
        self.base = {n: pretrained(n).to(torch.float32) for n in self.names}
        self.vectors = {
            n: torch.stack([e(n).to(torch.float32) for e in experts]) - self.base[n] for n in self.names
        }
        self.fixed = {n: pretrained(n) for n in state if n not in self.vectors}
        own = {n for n, _ in self.template.named_parameters()}
        self.buffers = {n for n in self.names if n not in own}

    def parameter_names(self) -> list[str]:
        """The merged tensors that are parameters of the model (not buffers)."""
        return [n for n in self.names if n not in self.buffers]

    @property
    def tasks(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def merged(self, coefficients: Tensor, masks: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``theta_0 + sum_t c[t, l] (m * tau_t)`` per tensor ``l`` (``coefficients``: (T, 1) or
        (T, len(names)); ``masks``: optional masks of some tensors, applied to every task vector)."""
        out: dict[str, Tensor] = dict(self.fixed)
        per_tensor = coefficients.expand(-1, len(self.names))  # task-wise: one column for every tensor
        for i, n in enumerate(self.names):
            # buffers (batch-norm statistics) follow their coefficients without a gradient: batch
            # norm cannot differentiate through its running statistics
            c = per_tensor[:, i].detach() if n in self.buffers else per_tensor[:, i]
            mask = None if masks is None else masks.get(n)
            update = torch.tensordot(c, self.vectors[n], dims=1)
            # one mask shared by the tasks: sum_t c_t (m * tau_t) = m * sum_t c_t tau_t (T times fewer products)
            out[n] = self.base[n] + (update if mask is None else mask * update)
        return out

    def forward(self, state: dict[str, Tensor], x: Any) -> Any:
        return functional_call(self.template, state, (x,))


def batch_inputs(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def prepared_batches(
    objective: str, names: Sequence[str], modules: Sequence[nn.Module], data: Sequence[Iterable[Any]]
) -> list[list[tuple[Tensor, Tensor | None]]]:
    """Each task's batches as ``(inputs, target)``: no target for ``entropy``, the expert's own
    predicted classes for ``expert_labels``, the batch's labels for ``labels``."""
    out = []
    for name, module, batches in zip(names, modules, data, strict=True):
        rows: list[tuple[Tensor, Tensor | None]] = []
        for batch in batches:
            x = batch_inputs(batch)
            target: Tensor | None = None
            if objective == "expert_labels":
                with torch.no_grad():
                    target = task_logits(module.eval()(x), name).argmax(-1)
            elif objective == "labels":
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise ConfigError(
                        f"objective='labels' needs (inputs, labels) batches; task {name!r} has inputs only."
                    )
                target = batch[1]
            rows.append((x, target))
        if not rows:
            raise ConfigError(f"No test-time batches for expert {name!r}.")
        out.append(rows)
    return out


def total_loss(
    model: TaskVectorModel,
    state: dict[str, Tensor],
    names: Sequence[str],
    streams: Sequence[Iterator[tuple[Tensor, Tensor | None]]],
    objective: str,
) -> Tensor:
    """The sum over tasks of the objective on each task's next batch (gradients accumulate over
    tasks, as in the official code)."""
    losses = []
    for name, stream in zip(names, streams, strict=True):
        x, target = next(stream)
        losses.append(adaptation_loss(objective, task_logits(model.forward(state, x), name), target))
    loss = torch.stack(losses).sum()
    if not torch.isfinite(loss):
        raise NonFiniteLossError("The test-time objective became non-finite; nothing was merged.")
    return loss


def check_choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise unknown_name(what, value, choices)
    return value


class CoefficientMerger(Merger):
    """Base of mergers whose result is ``theta_0 + sum_t c[t, l] tau_t`` with coefficients learned
    in :meth:`prepare`; subclasses implement :meth:`fit` (on a :class:`TaskVectorModel`)."""

    requires = frozenset({"unlabeled_batches"})

    def __init__(self, granularity: str = "layer", objective: str = "entropy") -> None:
        self.layers = check_choice(granularity, GRANULARITIES, "granularity")
        self.objective = check_choice(objective, OBJECTIVES, "objective")
        self._template: nn.Module | None = None
        self._batches: list[list[tuple[Tensor, Tensor | None]]] = []
        self._names: list[str] = []
        self._coefficients: dict[str, Tensor] = {}
        self._masks: dict[str, Tensor] = {}
        self._extras: dict[str, Any] = {}

    @property
    def granularity(self) -> str:
        return "model"

    def begin(self) -> None:
        self._template, self._batches, self._names = None, [], []
        self._coefficients, self._masks, self._extras = {}, {}, {}

    def collect_all(
        self, names: Sequence[str], modules: Sequence[nn.Module], data: Sequence[Iterable[Any]]
    ) -> None:
        self._template = modules[0]
        self._names = list(names)
        self._batches = prepared_batches(self.objective, names, modules, data)

    def prepare(self, names: Sequence[str], pretrained: Loader | None, experts: Sequence[Loader]) -> None:
        assert pretrained is not None and self._template is not None
        # the driver's names are the floating tensors it merges (integer ones it copies)
        model = TaskVectorModel(self._template, names, pretrained, experts)
        coefficients, masks = self.fit(model, [itertools.cycle(b) for b in self._batches])
        per_tensor = coefficients.detach().double().expand(-1, len(names))
        self._coefficients = {n: per_tensor[:, i] for i, n in enumerate(names)}
        self._masks = {n: m.detach().double() for n, m in (masks or {}).items()}

    def fit(
        self, model: TaskVectorModel, streams: list[Iterator[tuple[Tensor, Tensor | None]]]
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        raise NotImplementedError

    def coefficient_shape(self, model: TaskVectorModel) -> tuple[int, int]:
        return (model.tasks, len(model.names) if self.layers == "layer" else 1)

    def merge_tensor(self, name: str, pretrained: Tensor | None, experts: Sequence[Tensor]) -> Tensor:
        assert pretrained is not None
        mask = self._masks.get(name)
        merged = pretrained.clone()
        for ct, e in zip(self._coefficients[name].tolist(), experts, strict=True):
            tau = e - pretrained
            merged.add_(tau * mask if mask is not None else tau, alpha=ct)
        return merged

    def finish(self, experts: Sequence[str]) -> dict[str, Any]:
        table = {n: c.tolist() for n, c in self._coefficients.items()}
        return {"coefficients": table, **self._extras}


@register("adamerging")
class AdaMerging(CoefficientMerger):
    """AdaMerging (Yang, Wang, Shen, Liu, Guo, Wang, Tao, "AdaMerging: Adaptive Model Merging for
    Multi-Task Learning", ICLR 2024).

    ``theta = theta_0 + sum_t lambda_t tau_t`` with one coefficient per task (``granularity="task"``)
    or per task and tensor (``"layer"``: every floating tensor of the state is a layer, as every
    named parameter is in the official code), all starting at ``init`` (0.3), fitted by Adam (lr
    1e-3, ``steps`` 1000) on the sum over tasks of the objective on one batch of each task per step.

    Objectives: ``"entropy"`` (the paper: the mean prediction entropy on unlabelled inputs);
    ``"expert_labels"`` (mtlkit's variant: cross-entropy against each expert's own predicted classes
    on its task's inputs, so the merge imitates the experts instead of growing confident; the
    entropy objective collapses on weak heads, the merging notes' pilots saw it end below its own
    start); ``"labels"`` (a supervised control on labelled batches, not the paper's method).

    Data: ``merge(..., data={expert: batches})`` with each task's test-time inputs (give a split of
    their own, not the test split you score on); the experts as modules (or ``model=``) mapping a
    batch to logits, or to ``{task: logits}`` keyed by the experts' names. ``clamp`` (off, as the
    official default) keeps the coefficients in [0, 1]. ``MergeResult.extras`` holds the learned
    coefficients and the objective's first and last values. Departures: the tasks' losses are
    summed before one backward (the same gradient as the official per-task backward passes);
    floating buffers (normalisation statistics) are layers too, since the functional merge feeds
    them to the forward, but they take no gradient (batch norm cannot differentiate through its
    running statistics): a buffer's coefficient stays at ``init`` layer-wise, and follows its
    task's coefficient task-wise.
    """

    def __init__(
        self,
        granularity: str = "layer",
        objective: str = "entropy",
        steps: int = 1000,
        lr: float = 1e-3,
        init: float = 0.3,
        clamp: bool = False,
    ) -> None:
        super().__init__(granularity, objective)
        if steps < 0 or not lr > 0:
            raise ConfigError(f"adamerging: need steps >= 0 and lr > 0, got {steps}, {lr}.")
        self.steps, self.lr, self.init, self.clamp = int(steps), float(lr), float(init), bool(clamp)

    def fit(
        self, model: TaskVectorModel, streams: list[Iterator[tuple[Tensor, Tensor | None]]]
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        coefficients = torch.full(self.coefficient_shape(model), self.init, requires_grad=True)

        def keep_in_range() -> None:
            with torch.no_grad():
                coefficients.clamp_(0.0, 1.0)

        history = training_loop(
            [coefficients],
            self.lr,
            self.steps,
            lambda: total_loss(model, model.merged(coefficients), self._names, streams, self.objective),
            keep_in_range if self.clamp else None,
        )
        self._extras = {"objective": self.objective, "first_loss": history[:1], "last_loss": history[-1:]}
        return coefficients.detach(), None


def training_loop(
    parameters: Sequence[Tensor],
    lr: float,
    steps: int,
    loss: Callable[[], Tensor],
    after_step: Callable[[], None] | None = None,
) -> list[float]:
    """``steps`` Adam steps on ``loss()`` (then ``after_step()``); the values seen."""
    optimizer = torch.optim.Adam(list(parameters), lr=lr)
    history = []
    for _ in range(steps):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        history.append(float(value.detach()))
    return history
