"""The forward pass of a multi-input step: one forward per task's own batch."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtlkit.core.contract import MultiTaskOutput, forward_full
from mtlkit.core.tasks import Batch, TaskBatches, TaskLosses, TaskSet
from mtlkit.errors import TaskError


def check_task_names(tasks: TaskSet, batches: TaskBatches) -> None:
    unknown = sorted(set(batches.batches) - set(tasks.names))
    if unknown:
        raise TaskError(
            f"TaskBatches has batches for unknown task(s) {unknown}; the tasks are {tasks.names}."
        )


def multi_input_losses(
    model: nn.Module, tasks: TaskSet, batches: TaskBatches, hosts: TaskBatches | None = None
) -> tuple[TaskLosses, MultiTaskOutput]:
    """``{task: loss}`` with each task's loss from the model run on that task's batch.

    Tasks without a batch this step get a constant zero loss and a label count of 0, so every
    method treats them as unlabelled (weight 0, no gradient). The output carries the predictions
    of the tasks that ran and the auxiliary losses of every forward pass (named ``task/loss``);
    there is no shared representation (each task read different inputs). ``hosts``: host copies
    of the batches, whose targets are range-checked (the Trainer passes them on accelerators).
    """
    values: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}
    predictions: dict[str, Tensor] = {}
    aux: dict[str, Tensor] = {}
    for batch, part in task_parts(batches, tasks):
        name = part.names[0]
        output = forward_full(model, batch.inputs)
        mine = {name: output.predictions[name]}
        if hosts is not None:
            host = hosts.batches[name]
            part.check_targets(host.targets, mine, host.masks)
        losses = part.losses(mine, batch.targets, batch.masks)
        values[name] = losses[name]
        counts[name] = losses.labelled[0]  # type: ignore[index]
        predictions[name] = mine[name]
        for key, value in (output.aux_losses or {}).items():
            aux[f"{name}/{key}"] = value
    first = next(iter(values.values()))
    zero = torch.zeros((), dtype=first.dtype, device=first.device)
    none = torch.zeros_like(next(iter(counts.values())))
    ordered = {t: values.get(t, zero) for t in tasks.names}
    labelled = torch.stack([counts.get(t, none) for t in tasks.names])
    return TaskLosses(ordered, labelled), MultiTaskOutput(predictions, None, aux or None)


def task_parts(batch: Batch | TaskBatches, tasks: TaskSet) -> list[tuple[Batch, TaskSet]]:
    """The (batch, tasks it labels) pairs of a step: one pair for an ordinary batch, one per task
    for multi-input batches (evaluation)."""
    if isinstance(batch, Batch):
        return [(batch, tasks)]
    check_task_names(tasks, batch)
    return [(b, TaskSet([tasks[name]])) for name, b in batch.batches.items()]
