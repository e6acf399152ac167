"""Building blocks of mtlkit's architectures and the base class that implements the model
contract (:mod:`mtlkit.core.contract`): ``model(x)`` returns ``{task: output}``,
``model(x, full_output=True)`` a :class:`~mtlkit.core.contract.MultiTaskOutput` with the shared
representation, and the model names its shared and task-specific parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtlkit.core.contract import MultiTaskModel, MultiTaskOutput
from mtlkit.core.registry import Registry
from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ShapeMismatchError, TaskError, unknown_name

MODELS: Registry[nn.Module] = Registry("model")
register = MODELS.register


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}


def mlp(
    in_features: int,
    dims: Sequence[int],
    activation: str = "relu",
    dropout: float = 0.0,
    batch_norm: bool = False,
    out_features: int | None = None,
) -> nn.Sequential:
    """``Linear -> [BatchNorm] -> activation -> [Dropout]`` per hidden width, then an optional
    plain ``Linear`` output layer."""
    if activation not in ACTIVATIONS:
        raise unknown_name("activation", activation, ACTIVATIONS)
    layers: list[nn.Module] = []
    width = in_features
    for d in dims:
        layers.append(nn.Linear(width, d))
        if batch_norm:
            layers.append(nn.BatchNorm1d(d))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = d
    if out_features is not None:
        layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def last_weight_layer(module: nn.Module) -> nn.Module:
    """The last submodule of ``module`` (in registration order) whose own ``weight`` is a matrix
    or a convolution kernel, i.e. the last linear-like layer (normalisation layers are skipped)."""
    found = None
    for m in module.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() >= 2:
            found = m
    if found is None:
        raise TaskError(f"{type(module).__name__} has no layer with a weight matrix.")
    return found


def task_names(tasks: TaskSet | Sequence[Task] | Sequence[str]) -> list[str]:
    names = [t.name if isinstance(t, Task) else str(t) for t in tasks]
    if not names:
        raise TaskError("A multi-task model needs at least one task.")
    if len(set(names)) != len(names):
        raise TaskError(f"Duplicate task names {names}.")
    return names


def resolve_out_features(names: Sequence[str], out_features: int | Mapping[str, int]) -> dict[str, int]:
    if isinstance(out_features, Mapping):
        unknown = set(out_features) - set(names)
        if unknown:
            raise TaskError(f"out_features names unknown tasks {sorted(unknown)}; tasks are {list(names)}.")
        return {n: int(out_features.get(n, 1)) for n in names}
    return {n: int(out_features) for n in names}


class MultiTaskModule(nn.Module):
    """Base class for mtlkit architectures: the contract's ``forward``, task bookkeeping and the
    parameter split.

    A subclass implements :meth:`forward_tasks` (predictions for the selected tasks plus the
    shared representation) and names its modules (:meth:`shared_modules`, :meth:`task_modules`).
    """

    #: whether the tasks must be the ordered binary steps of a conversion funnel (ESMM, AITM);
    #: the registry-driven tests read it to build suitable tasks
    funnel: ClassVar[bool] = False

    def __init__(self, tasks: TaskSet | Sequence[Task] | Sequence[str]) -> None:
        super().__init__()
        self.task_names = task_names(tasks)

    def forward(
        self, x: Any, task: str | None = None, *, full_output: bool = False
    ) -> dict[str, Tensor] | MultiTaskOutput:
        """``{task: output}`` for every task (or only ``task``); with ``full_output`` a
        :class:`~mtlkit.core.contract.MultiTaskOutput` that also carries the representation."""
        out = self.forward_tasks(x, self._selected(task))
        return out if full_output else out.predictions

    def forward_tasks(self, x: Any, tasks: list[str]) -> MultiTaskOutput:
        """Predictions for ``tasks``, the shared representation and any auxiliary losses."""
        raise NotImplementedError

    def shared_modules(self) -> Iterable[nn.Module]:
        raise NotImplementedError

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        raise NotImplementedError

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.shared_modules() for p in m.parameters() if p.requires_grad]

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {
            t: [p for m in self.task_modules(t) for p in m.parameters() if p.requires_grad]
            for t in self.task_names
        }

    def last_shared_layers(self) -> list[nn.Module]:
        """The last weight-carrying layer of each shared module that has one (override where the
        shared part has parallel branches, as MMoE does for its experts)."""
        layers = []
        for m in self.shared_modules():
            try:
                layers.append(last_weight_layer(m))
            except TaskError:
                continue  # a module without weight matrices (an input stage without a stem)
        return layers

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The weight matrices of :meth:`last_shared_layers`: the "last shared layer of weights"
        at which GradNorm (Chen et al., ICML 2018) measures the task gradient norms."""
        weights = [getattr(m, "weight", None) for m in self.last_shared_layers()]
        return [w for w in weights if isinstance(w, nn.Parameter) and w.requires_grad]

    def routing_statistics(self) -> dict[str, float]:
        """Scalars about the last forward's routing (gate weights, expert usage) for the logs;
        empty for models without gates."""
        return {}

    def example_input(self, batch: int = 4) -> Tensor:
        """A random input batch of the shape the model reads (for tests and benchmarks)."""
        shape = getattr(self, "in_features", None)
        if shape is None:
            raise NotImplementedError(f"{type(self).__name__} does not say what input it reads.")
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        return torch.randn(batch, *dims)

    def _selected(self, task: str | None) -> list[str]:
        if task is None:
            return self.task_names
        if task not in self.task_names:
            raise unknown_name("task", task, self.task_names)
        return [task]


def check_input(x: Tensor, in_features: int, model: str) -> None:
    """Raise a clear error when ``x`` is not a (batch, in_features) tensor."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != in_features:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ShapeMismatchError(f"{model} expects inputs of shape (batch, {in_features}), got {shape}.")


__all__ = [
    "ACTIVATIONS",
    "MODELS",
    "MultiTaskModel",
    "MultiTaskModule",
    "MultiTaskOutput",
    "check_input",
    "mlp",
    "register",
    "resolve_out_features",
    "task_names",
]
