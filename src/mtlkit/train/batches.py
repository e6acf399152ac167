"""Batch plumbing: moving batches to a device (the batch forms the Trainer accepts are
:func:`mtlkit.core.tasks.unpack_batch`'s)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mtlkit.core.tasks import Batch, TaskBatches, unpack_batch


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


__all__ = ["move_to", "unpack_batch"]
