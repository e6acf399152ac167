"""Batch plumbing: the batch forms the Trainer accepts and moving them to a device."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mtlkit.core.tasks import Batch, TaskBatches
from mtlkit.errors import TaskError


def move_to(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (inside a Batch, mappings, lists, tuples) on ``device``."""
    if isinstance(obj, Batch):
        return Batch(move_to(obj.inputs, device), move_to(obj.targets, device), move_to(obj.masks, device))
    if isinstance(obj, TaskBatches):
        return TaskBatches({t: move_to(b, device) for t, b in obj.batches.items()})
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


def unpack_batch(batch: Any) -> Batch | TaskBatches:
    """Accept ``Batch``, ``(x, targets)``, ``(x, targets, masks)``, a dict with those keys, or
    ``TaskBatches`` (multi-input training, passed through)."""
    if isinstance(batch, (Batch, TaskBatches)):
        return batch
    if isinstance(batch, Mapping) and "inputs" in batch and "targets" in batch:
        return Batch(batch["inputs"], dict(batch["targets"]), batch.get("masks"))
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3) and isinstance(batch[1], Mapping):
        return Batch(
            batch[0], dict(batch[1]), dict(batch[2]) if len(batch) == 3 and batch[2] is not None else None
        )
    raise TaskError(
        "A batch must be (inputs, {task: target}), (inputs, targets, {task: mask}), a dict with "
        f"'inputs' and 'targets', or mtlkit.Batch; got {type(batch).__name__}."
    )
