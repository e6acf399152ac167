"""The forward pass of a multi-input step: one forward per task's own batch."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtlkit.core.contract import MultiTaskOutput, forward_full
from mtlkit.core.tasks import Batch, TaskBatches, TaskLosses, TaskSet
from mtlkit.errors import MissingTaskError, TaskError


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
    check_task_names(tasks, batches)
    values: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}
    predictions: dict[str, Tensor] = {}
    aux: dict[str, Tensor] = {}
    for task in tasks:
        batch = batches.batches.get(task.name)
        if batch is None:
            continue
        output = forward_full(model, batch.inputs)
        pred = output.predictions[task.name]
        target = _target(batch, task.target_key, task.name)
        if hosts is not None:
            host = hosts.batches[task.name]
            TaskSet([task]).check_targets(host.targets, {task.name: pred}, host.masks)
        mask = batch.masks.get(task.name) if batch.masks else None
        values[task.name], counts[task.name] = task.loss_value(pred, target, mask)
        predictions[task.name] = pred
        for name, value in (output.aux_losses or {}).items():
            aux[f"{task.name}/{name}"] = value
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


def _target(batch: Batch, key: str, name: str) -> Tensor:
    if key not in batch.targets:
        raise MissingTaskError(
            f"Task {name!r}'s batch has no target {key!r}; it has {sorted(batch.targets)}."
        )
    return batch.targets[key]
