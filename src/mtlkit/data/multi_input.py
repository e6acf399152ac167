"""Multi-input training: one DataLoader per task, for tasks that do not share inputs.

Each step yields a :class:`~mtlkit.core.tasks.TaskBatches` (``{task: Batch}``); the Trainer runs
the model once per task's batch and hands the resulting losses to any method, which combines
them as usual (parameter-level per-task gradients; there is no single shared representation
when each task reads its own inputs). Every task's iterator restarts on its own when it runs
out, so tasks of unequal sizes train together.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import torch

from mtlkit.core.task_sampling import TaskSchedule, make_schedule
from mtlkit.core.tasks import Batch, TaskBatches, unpack_batch
from mtlkit.errors import ConfigError, EmptyDataError, TaskError

Mode = Literal["longest", "shortest", "sequential"]


class MultiInputLoader:
    """Iterate several per-task loaders as one multi-task loader.

    Args:
        loaders: ``{task: loader}``; each yields :class:`~mtlkit.core.tasks.Batch` objects whose
            targets hold that task's target (``mk.data.loader`` over a single-task dataset), or
            ``(inputs, {task: target})`` pairs.
        schedule: ``None``: every step holds a batch of every task. A
            :class:`~mtlkit.core.task_sampling.TaskSchedule` or a name (``"uniform"``,
            ``"proportional"`` -- to the loaders' dataset sizes, with ``temperature`` --, or
            ``"round_robin"``): every step holds the batch of one sampled task only, which is
            alternating gradient descent (IMP) with any method (``ew`` for the paper's).
        mode: without a schedule, ``"longest"`` (default: an epoch lasts as long as the longest
            loader, the others restart) or ``"shortest"``; ``"sequential"`` goes through every
            loader once, one task at a time (for evaluation).
        steps_per_epoch: with a schedule, the steps of one epoch (default: the loaders' total
            number of batches, so every batch is seen once per epoch in expectation).
        temperature: of the ``"proportional"`` schedule.

    Determinism: ``generator`` is seeded by the Trainer at every epoch; each epoch then restarts
    the schedule and re-seeds every task loader that has a ``torch.Generator`` from it, so an
    epoch's batches depend only on (seed, epoch) and a resumed run sees the same ones.
    """

    def __init__(
        self,
        loaders: Mapping[str, Iterable[Any]],
        schedule: TaskSchedule | str | None = None,
        *,
        mode: Mode = "longest",
        steps_per_epoch: int | None = None,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        if not loaders:
            raise EmptyDataError("MultiInputLoader needs at least one task's loader.")
        self.loaders = dict(loaders)
        self.names = list(self.loaders)
        lengths = {t: _length(loader) for t, loader in self.loaders.items()}
        empty = [t for t, n in lengths.items() if n == 0]
        if empty:
            raise EmptyDataError(f"The loader(s) of task(s) {empty} yield no batch.")
        self.lengths = lengths
        if mode not in ("longest", "shortest", "sequential"):
            raise ConfigError(f"mode must be 'longest', 'shortest' or 'sequential', got {mode!r}.")
        if schedule is not None and mode == "sequential":
            raise ConfigError("mode='sequential' visits every loader once; it takes no schedule.")
        self.mode = mode
        if isinstance(schedule, str):
            sizes = [_size(self.loaders[t]) for t in self.names] if schedule == "proportional" else None
            schedule = make_schedule(
                schedule, len(self.names), sizes=sizes, temperature=temperature, seed=seed
            )
        if schedule is not None and schedule.num_tasks != len(self.names):
            raise ConfigError(
                f"The schedule is for {schedule.num_tasks} tasks; there are {len(self.names)} loaders."
            )
        self.schedule = schedule
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise ConfigError(f"steps_per_epoch must be an integer >= 1, got {steps_per_epoch!r}.")
        if steps_per_epoch is not None and schedule is None:
            raise ConfigError("steps_per_epoch applies with a schedule; without one, mode sets the epoch.")
        self.steps_per_epoch = steps_per_epoch
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        if self.schedule is not None:
            return self.steps_per_epoch or sum(self.lengths.values())
        if self.mode == "sequential":
            return sum(self.lengths.values())
        pick = max if self.mode == "longest" else min
        return pick(self.lengths.values())

    def __iter__(self) -> Iterator[TaskBatches]:
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        for i, loader in enumerate(self.loaders.values()):
            gen = getattr(loader, "generator", None)
            if isinstance(gen, torch.Generator):
                gen.manual_seed(seed + i + 1)
        if self.mode == "sequential":
            for name, loader in self.loaders.items():
                for batch in loader:
                    yield TaskBatches({name: _as_batch(batch, name)})
            return
        streams = {t: _Restarting(loader, t) for t, loader in self.loaders.items()}
        if self.schedule is None:
            for _ in range(len(self)):
                yield TaskBatches({t: s.next() for t, s in streams.items()})
            return
        self.schedule.reset(seed)
        for _ in range(len(self)):
            t = self.names[self.schedule.next()]
            yield TaskBatches({t: streams[t].next()})


class _Restarting:
    """A task's batches, starting over when its loader runs out."""

    def __init__(self, loader: Iterable[Any], name: str) -> None:
        self.loader, self.name = loader, name
        self.it = iter(loader)

    def next(self) -> Batch:
        try:
            return _as_batch(next(self.it), self.name)
        except StopIteration:
            self.it = iter(self.loader)
            try:
                return _as_batch(next(self.it), self.name)
            except StopIteration:
                raise EmptyDataError(f"Task {self.name!r}'s loader yields no batch.") from None


def _as_batch(batch: Any, name: str) -> Batch:
    try:
        out = unpack_batch(batch)
    except TaskError as exc:
        raise ConfigError(f"Task {name!r}'s loader yields something that is not a batch: {exc}") from None
    if not isinstance(out, Batch):
        raise ConfigError(f"Task {name!r}'s loader must yield one task's mtlkit.Batch, not TaskBatches.")
    return out


def _length(loader: Iterable[Any]) -> int:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(
            "Every task's loader must have a length (a DataLoader over a sized dataset)."
        ) from None


def _size(loader: Iterable[Any]) -> int:
    """The number of examples behind a loader (its dataset's), else its number of batches."""
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else _length(loader)
    except TypeError:
        return _length(loader)
