"""EW: equal weighting / linear scalarisation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtlkit.core.tasks import TaskSet
from mtlkit.errors import ConfigError
from mtlkit.methods.hparams import hparam, none, number, numbers
from mtlkit.methods.loss_weighting import LossWeighting
from mtlkit.methods.registry import register


@register("ew")
class EW(LossWeighting):
    """Equal weighting (linear scalarisation): one backward of ``sum_k c_k L_k``.

    The baseline of every MTL comparison (e.g. Navon et al., "Multi-Task Learning as a Bargaining
    Game", ICML 2022; Lin et al., "Reasonable Effectiveness of Random Weighting", TMLR 2022). As in
    the official Nash-MTL, FAMO and LibMTL code the losses are SUMMED (``c_k = 1``), not averaged;
    with SGD this sets the effective learning rate, with Adam it hardly matters.

    The weights ``c_k`` come from ``weights=`` or, when it is not given, from the tasks'
    ``Task(weight=...)`` (read in :meth:`setup`); giving both with different values is an error.
    """

    uses_task_weights = True
    task_weights: Tensor
    weights: Sequence[float] | Mapping[str, float] | None = hparam(
        None,
        numbers(number(ge=0), keyed=True) | none(),
        "fixed weights c_k in task order, or {task: weight} (others keep 1); default: Task.weight",
    )

    def _build(self, tasks: TaskSet) -> None:
        fixed = self.weights
        from_tasks = tasks.weights
        if fixed is None:
            values = list(from_tasks)
        elif isinstance(fixed, Mapping):
            unknown = set(fixed) - set(tasks.names)
            if unknown:
                raise ConfigError(
                    f"EW weights name unknown tasks {sorted(unknown)}; tasks are {tasks.names}."
                )
            values = [float(fixed.get(n, 1.0)) for n in tasks.names]
        else:
            values = [float(v) for v in fixed]
            if len(values) != len(tasks):
                raise ConfigError(f"EW got {len(values)} fixed weights for {len(tasks)} tasks.")
        if fixed is not None and any(w != 1.0 for w in from_tasks) and values != list(from_tasks):
            raise ConfigError(
                f"EW got weights={fixed!r} and different Task(weight=...) values {from_tasks}; set them "
                "in one place."
            )
        self.register_buffer("task_weights", torch.tensor(values), persistent=False)

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        w = self.task_weights
        return w if w.device == losses.device else w.to(losses.device)
