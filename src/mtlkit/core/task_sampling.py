"""Task schedules for alternating training: which task (or task group) the next step trains.

Alternating gradient descent (AGD; Akbari, Kondratyuk, Cui, Hornung, Wang, Adam, "Alternating
Gradient Descent and Mixture-of-Experts for Integrated Multimodal Perception", NeurIPS 2023) takes
one optimiser step per sampled task. The schedules here serve both places that sample a task: the
``agd`` method (one task's loss per step on an ordinary multi-task batch) and the multi-input
loader (one task's batch per step, when tasks do not share inputs).

- :class:`RandomTaskSchedule`: task ``t`` with probability ``p_t``; ``uniform``, fixed weights, or
  size-proportional with a temperature, ``p_t ~ n_t^(1/T)`` (``T = 1``: proportional to the data
  size; large ``T``: close to uniform);
- :class:`RoundRobinSchedule`: the public IMP code's executor: an outer loop visits the tasks in
  order; each task counts its visits and is trained only on visits that are multiples of its
  interval.

A schedule is deterministic given its seed; its state (generator, counters) round-trips through
``state_dict``, so a resumed run draws the same tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from mtlkit.errors import ConfigError


class TaskSchedule:
    """Base class: :meth:`next` returns the index of the task the next step trains."""

    num_tasks: int

    def next(self, allowed: Sequence[bool] | None = None) -> int:
        """The next task; ``allowed`` (one flag per task) restricts the draw to tasks that can be
        trained this step (e.g. those with a labelled sample in the batch)."""
        raise NotImplementedError

    def reset(self, seed: int) -> None:
        """Start again from ``seed`` (a multi-input loader does this at every epoch)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


class RandomTaskSchedule(TaskSchedule):
    """Task ``t`` with probability ``probabilities[t]`` at every step (independent draws).

    When some tasks are not ``allowed`` in a step, the draw is over the allowed ones with their
    probabilities renormalised (the step never trains a task it cannot).
    """

    def __init__(self, probabilities: Sequence[float], seed: int = 0) -> None:
        probs = [float(p) for p in probabilities]
        if not probs:
            raise ConfigError("A task schedule needs at least one task.")
        if any(not math.isfinite(p) or p < 0 for p in probs) or sum(probs) <= 0:
            raise ConfigError(f"Task probabilities must be finite, >= 0 and not all 0; got {probs}.")
        total = sum(probs)
        self.probabilities = torch.tensor([p / total for p in probs], dtype=torch.float64)
        self.num_tasks = len(probs)
        self.generator = torch.Generator().manual_seed(int(seed))

    def next(self, allowed: Sequence[bool] | None = None) -> int:
        p = self.probabilities
        if allowed is not None:
            mask = torch.tensor([bool(a) for a in allowed], dtype=torch.bool)
            if len(mask) != self.num_tasks:
                raise ConfigError(f"allowed has {len(mask)} flags for {self.num_tasks} tasks.")
            p = torch.where(mask, p, torch.zeros_like(p))
            if float(p.sum()) <= 0:  # only zero-probability tasks are allowed: none is trained
                return -1
        return int(torch.multinomial(p, 1, generator=self.generator))

    def reset(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class RoundRobinSchedule(TaskSchedule):
    """The IMP executor's deterministic schedule: visit the tasks in order, forever; task ``t``
    keeps a visit counter ``c_t`` and is trained on a visit when ``c_t % intervals[t] == 0``
    (then every visit counts, trained or not). Intervals of 1 give plain round robin.

    A task that is not ``allowed`` is passed over (its visit still counts).
    """

    def __init__(self, intervals: Sequence[int]) -> None:
        ints = list(intervals)
        if not ints or any(not isinstance(i, int) or isinstance(i, bool) or i < 1 for i in ints):
            raise ConfigError(f"Round-robin intervals must be integers >= 1, one per task; got {ints}.")
        self.intervals = ints
        self.num_tasks = len(ints)
        self.position = 0
        self.visits = [0] * len(ints)

    def next(self, allowed: Sequence[bool] | None = None) -> int:
        if allowed is not None and len(allowed) != self.num_tasks:
            raise ConfigError(f"allowed has {len(allowed)} flags for {self.num_tasks} tasks.")
        # a full cycle of the least common multiple of the intervals reaches every task
        for _ in range(self.num_tasks * math.lcm(*self.intervals)):
            t = self.position
            self.position = (self.position + 1) % self.num_tasks
            due = self.visits[t] % self.intervals[t] == 0
            self.visits[t] += 1
            if due and (allowed is None or allowed[t]):
                return t
        return -1

    def reset(self, seed: int) -> None:
        self.position = 0
        self.visits = [0] * self.num_tasks

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "visits": list(self.visits)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        self.visits = [int(v) for v in state["visits"]]


SCHEDULES = ("uniform", "weighted", "proportional", "round_robin")


def make_schedule(
    kind: str,
    num_tasks: int,
    *,
    weights: Sequence[float] | None = None,
    sizes: Sequence[int] | None = None,
    temperature: float = 1.0,
    intervals: Sequence[int] | None = None,
    seed: int = 0,
) -> TaskSchedule:
    """A schedule by name: ``uniform``; ``weighted`` (``weights``); ``proportional`` (``sizes``,
    ``p_t ~ n_t^(1/temperature)``); ``round_robin`` (``intervals``, default all 1)."""

    def need(name: str, value: Sequence[Any] | None) -> Sequence[Any]:
        if value is None or len(value) != num_tasks:
            raise ConfigError(f"The {kind!r} task schedule needs {name}: one value per task ({num_tasks}).")
        return value

    if kind == "uniform":
        return RandomTaskSchedule([1.0] * num_tasks, seed)
    if kind == "weighted":
        return RandomTaskSchedule(need("weights", weights), seed)
    if kind == "proportional":
        if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
            raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}.")
        n = need("sizes", sizes)
        if any(not isinstance(v, int) or v < 0 for v in n):
            raise ConfigError(f"sizes must be integers >= 0, got {list(n)}.")
        return RandomTaskSchedule([float(v) ** (1.0 / temperature) for v in n], seed)
    if kind == "round_robin":
        return RoundRobinSchedule(list(intervals) if intervals is not None else [1] * num_tasks)
    raise ConfigError(f"Unknown task schedule {kind!r}; choose one of {list(SCHEDULES)}.")
