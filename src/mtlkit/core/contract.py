"""The multi-task model contract, as the layers above need it.

A multi-task model is an ``nn.Module`` that

- returns ``{task: output}`` from ``model(x)`` (one task's entry only with ``model(x, task=name)``);
- returns a :class:`MultiTaskOutput` from ``model(x, full_output=True)``: the same predictions,
  the shared representation (one tensor, or ``{task: tensor}`` when each task reads its own
  representation, as in multi-level PLE, MTAN or cross-stitch) and auxiliary losses. Everything
  travels in the return value, so a ``DistributedDataParallel`` wrapper passes it through (a
  named tuple is a pytree node); there is no attribute side channel;
- names its parameters: ``shared_parameters()`` (gradients combined by the multi-task method) and
  ``task_parameters()`` (``{task: [parameters]}``; the rest). The split need not be a tree: a
  parameter listed under several tasks, or reached by the losses of several tasks, receives the
  (own or weighted) gradients of all of them, never one task's alone;
- optionally ``last_shared_parameters()``: the weights of the last shared layer (GradNorm's
  default layer).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

from torch import Tensor, nn

from mtlkit.errors import ModelContractError

Representation = Tensor | Mapping[str, Tensor]


class MultiTaskOutput(NamedTuple):
    """What ``model(x, full_output=True)`` returns.

    Attributes:
        predictions: ``{task: output}``, exactly what ``model(x)`` returns.
        representation: the shared representation for representation-level methods: one tensor
            that every task reads, or ``{task: tensor}`` (each task reads only its own entry, all
            of one shape); ``None`` when the model has none.
        aux_losses: ``{name: scalar}`` losses of the model itself (load balance, entropy), added
            to the update with weight 1 outside the multi-task weighting; ``None`` for none.
    """

    predictions: dict[str, Tensor]
    representation: Representation | None = None
    aux_losses: Mapping[str, Tensor] | None = None


@runtime_checkable
class MultiTaskModel(Protocol):
    """The structural type of a multi-task model (see the module docstring)."""

    def __call__(self, x: Any, task: str | None = None) -> dict[str, Tensor]: ...

    def shared_parameters(self) -> list[nn.Parameter]: ...

    def task_parameters(self) -> dict[str, list[nn.Parameter]]: ...


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel``/``DataParallel`` wrapper or a
    ``torch.compile`` result (the object that carries ``shared_parameters()``)."""
    seen = 0
    while seen < 8:
        inner = getattr(model, "module", None) if isinstance(model, (nn.DataParallel, _ddp())) else None
        inner = inner if inner is not None else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model, seen = inner, seen + 1
    return model


def parameter_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The optimiser's parameter groups for ``model``: its own ``optimizer_groups(lr=,
    weight_decay=)`` when it defines one (a model whose official recipe trains some parameters at
    another rate, e.g. Poly/MHR's routing logits), else one group of every parameter at ``lr``."""
    own = getattr(unwrap(model), "optimizer_groups", None)
    if callable(own):
        return list(own(lr=lr, weight_decay=weight_decay))
    return [{"params": list(model.parameters()), "lr": lr, "weight_decay": weight_decay}]


def _ddp() -> type:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel


_FULL_OUTPUT: dict[type, bool] = {}


def supports_full_output(model: nn.Module) -> bool:
    """Whether the (unwrapped) model's ``forward`` takes ``full_output``."""
    inner = unwrap(model)
    cls = type(inner)
    if cls not in _FULL_OUTPUT:
        try:
            names = set(inspect.signature(inner.forward).parameters)
        except (TypeError, ValueError):
            names = set()
        _FULL_OUTPUT[cls] = "full_output" in names
    return _FULL_OUTPUT[cls]


def forward_full(model: nn.Module, x: Any) -> MultiTaskOutput:
    """``model(x, full_output=True)`` for contract models, else the predictions alone."""
    if supports_full_output(model):
        out = model(x, full_output=True)
        if not isinstance(out, MultiTaskOutput):
            raise ModelContractError(
                f"{type(unwrap(model)).__name__}(x, full_output=True) must return a MultiTaskOutput, "
                f"got {type(out).__name__}."
            )
        return out
    out = model(x)
    if not isinstance(out, Mapping):
        raise ModelContractError(
            f"{type(unwrap(model)).__name__}(x) must return {{task: output}}, got {type(out).__name__}."
        )
    return MultiTaskOutput(dict(out))


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    inner = unwrap(model)
    fn = getattr(inner, "shared_parameters", None)
    if not callable(fn):
        raise ModelContractError(
            f"{type(inner).__name__} has no shared_parameters(): a multi-task model returns "
            "{task: output} and names its shared parameters (see mtlkit.models.MultiTaskModule)."
        )
    return list(fn())


def task_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]] | None:
    fn = getattr(unwrap(model), "task_parameters", None)
    return {k: list(v) for k, v in fn().items()} if callable(fn) else None


def check_parameter_split(model: nn.Module) -> None:
    """Every trainable parameter must be shared or task-specific: one in neither list would get no
    gradient at all from a multi-task method (a silently frozen layer)."""
    inner = unwrap(model)
    shared = {id(p) for p in shared_parameters(inner)}
    tasks = task_parameters(inner)
    if tasks is None:
        return  # task-specific parameters are then found from the autograd graph
    specific = {id(p) for ps in tasks.values() for p in ps}
    missing = [n for n, p in inner.named_parameters() if p.requires_grad and id(p) not in shared | specific]
    if missing:
        raise ModelContractError(
            f"{type(inner).__name__}: trainable parameter(s) {missing[:5]} are in neither "
            "shared_parameters() nor task_parameters(); a multi-task method would leave them without "
            "gradient. List them in one of the two."
        )
    both = [n for n, p in inner.named_parameters() if id(p) in shared and id(p) in specific]
    if both:
        raise ModelContractError(
            f"{type(inner).__name__}: parameter(s) {both[:5]} are both shared and task-specific."
        )
