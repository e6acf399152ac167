"""AGD: alternating gradient descent, one task per optimiser step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtlkit.core.task_sampling import SCHEDULES, TaskSchedule, make_schedule
from mtlkit.core.tasks import TaskSet
from mtlkit.errors import ConfigError
from mtlkit.methods.hparams import hparam, none, number, numbers, one_of
from mtlkit.methods.loss_weighting import LossWeighting
from mtlkit.methods.registry import register


@register("agd")
class AGD(LossWeighting):
    """Alternating gradient descent: Akbari, Kondratyuk, Cui, Hornung, Wang, Adam, "Alternating
    Gradient Descent and Mixture-of-Experts for Integrated Multimodal Perception" (IMP), NeurIPS
    2023.

    Every optimiser step trains one task: the schedule picks ``t`` and the step back-propagates
    ``L_t`` alone (weight 1, the others 0), with one optimiser shared by all tasks (its state is
    never reset on a task switch). Schedules (:mod:`mtlkit.core.task_sampling`): ``uniform``;
    ``weighted`` (fixed probabilities ``weights``, the paper's mixture); ``proportional``
    (``p_t ~ sizes_t^(1/temperature)``); ``round_robin`` (the public code's executor: tasks
    visited in order, task ``t`` trained on every ``intervals[t]``-th visit).

    This is AGD on batches that carry every task's labels. When tasks have their own inputs, put
    the schedule in :class:`mtlkit.data.MultiInputLoader` instead (it then loads only the
    sampled task's batch) and train with ``ew``. A task without a labelled sample in the batch
    is never drawn (random schedules renormalise over the labelled tasks; round robin passes it
    over). With decoupled weight decay (AdamW), a head whose task was not drawn has no gradient
    and PyTorch's optimisers skip it entirely that step (no decay, no momentum step); the JAX
    reference, which updates the whole parameter tree, would decay it. The schedule's state is
    part of the checkpoint, so a resumed run draws the same tasks.
    """

    schedule: str = hparam("uniform", one_of(*SCHEDULES), "how the next step's task is chosen")
    weights: list[float] | None = hparam(
        None, numbers(number(ge=0)) | none(), "task probabilities for schedule='weighted'"
    )
    sizes: list[int] | None = hparam(
        None, numbers(number(ge=0, integer=True)) | none(), "task data sizes for schedule='proportional'"
    )
    temperature: float = hparam(1.0, number(gt=0), "proportional schedule: p_t ~ size_t^(1/temperature)")
    intervals: list[int] | None = hparam(
        None,
        numbers(number(ge=1, integer=True)) | none(),
        "round_robin: train task t every intervals[t] visits",
    )
    seed: int = hparam(0, number(ge=0, integer=True), "seed of the random schedules")

    def _validate(self) -> None:
        wanted = {"weighted": "weights", "proportional": "sizes"}.get(self.schedule)
        if wanted is not None and getattr(self, wanted) is None:
            raise ConfigError(f"AGD schedule {self.schedule!r} needs {wanted}= (one value per task).")
        for name, used_by in (
            ("weights", "weighted"),
            ("sizes", "proportional"),
            ("intervals", "round_robin"),
        ):
            if getattr(self, name) is not None and self.schedule != used_by:
                raise ConfigError(
                    f"AGD option {name}= applies to schedule={used_by!r} only; the schedule is "
                    f"{self.schedule!r}, which would ignore it."
                )

    def _build(self, tasks: TaskSet) -> None:
        self._schedule: TaskSchedule = make_schedule(
            self.schedule,
            len(tasks),
            weights=self.weights,
            sizes=self.sizes,
            temperature=self.temperature,
            intervals=self.intervals,
            seed=self.seed,
        )
        self._last = -1

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        t = self._schedule.next([bool(a) for a in active.tolist()])
        self._last = t
        w = torch.zeros(len(losses), dtype=losses.dtype, device=losses.device)
        if t >= 0:
            w[t] = 1.0
        return w

    def step_extras(self) -> dict[str, Any]:
        return {"task": self._last}

    def _extra_state(self) -> dict[str, Any]:
        return {"schedule": self._schedule.state_dict()} if hasattr(self, "_schedule") else {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "schedule" in state and hasattr(self, "_schedule"):
            self._schedule.load_state_dict(state["schedule"])
