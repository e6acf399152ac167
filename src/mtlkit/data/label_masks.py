"""Batches that also tell the model which samples carry each task's label (for models whose own
regularisers are per task, as InfoMTL's compression term)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from mtlkit.core.tasks import Batch, TaskSet
from mtlkit.errors import TaskError


class with_label_masks:
    """Wrap a loader of :class:`~mtlkit.core.tasks.Batch` objects so that the inputs become
    ``{"x": inputs, "labelled": {task: (B,) bool}}`` (a sample counts as labelled for a task when
    any entry of its target is). Length and ``generator`` are the wrapped loader's, so the
    Trainer's per-epoch seeding and exact resume work unchanged."""

    def __init__(self, loader: Iterable[Any], tasks: TaskSet) -> None:
        self.loader, self.tasks = loader, tasks

    @property
    def generator(self) -> Any:
        return getattr(self.loader, "generator", None)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            if not isinstance(batch, Batch):
                raise TaskError(
                    f"with_label_masks wraps loaders of mtlkit.Batch, got {type(batch).__name__}."
                )
            entries = self.tasks.labelled_masks(batch.targets, batch.masks)
            labelled = {t: m.reshape(m.shape[0], -1).any(dim=1) for t, m in entries.items()}
            yield Batch({"x": batch.inputs, "labelled": labelled}, batch.targets, batch.masks)
