"""Run a method's whole lifecycle from a plain PyTorch (or Lightning) loop."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from mtlkit.core.contract import MultiTaskOutput
from mtlkit.core.tasks import Task, TaskSet
from mtlkit.methods.base import Closure, Hook, Losses, Method, StepInfo


class Driver:
    """The lifecycle of a multi-task method in your own loop, in three calls.

    ::

        driver = mk.methods.Driver(method, model, optimizer, tasks)  # setup + the method's parameters
        for epoch in range(epochs):
            with driver.epoch():  # begin_epoch() ... on_epoch_end()
                for x, y in loader:
                    optimizer.zero_grad()
                    out = model(x, full_output=True)
                    info = driver.backward(tasks.losses(out.predictions, y), out)
                    optimizer.step()
                    driver.after_step(lambda: tasks.losses(model(x), y))  # only if the method needs it

    The constructor calls ``method.setup(tasks, model)`` and adds ``method.param_groups()`` to the
    optimiser (its own learning rate, no weight decay). ``after_step`` evaluates the losses only
    for methods with the :attr:`~mtlkit.methods.Hook.AFTER_STEP` hook, under ``torch.no_grad()``.
    Every skipped call is caught by the method itself on the next step
    (:class:`~mtlkit.errors.LifecycleError`).
    """

    def __init__(
        self,
        method: Method,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        tasks: TaskSet | Iterable[Task] | Iterable[str],
    ) -> None:
        self.method = method
        self.model = model
        self.optimizer = optimizer
        method.setup(tasks, model=model)
        first = next(iter(model.parameters()), None)
        if first is not None:
            method.to(first.device)  # before the optimiser sees the method's parameters
        groups = method.param_groups()
        if groups and optimizer is None:
            raise ValueError(f"{type(method).__name__} has learnable parameters: pass the optimiser.")
        if optimizer is not None:
            add_param_groups(optimizer, groups)

    @contextmanager
    def epoch(self) -> Iterator[None]:
        """One epoch: ``begin_epoch()`` on entry, ``on_epoch_end()`` when the block completes (an
        error inside the block aborts the epoch without its hook, so it can be run again)."""
        self.method.begin_epoch()
        try:
            yield
        except BaseException:
            self.method.abort_epoch()
            raise
        self.method.on_epoch_end()

    def backward(
        self,
        losses: Losses,
        output: MultiTaskOutput | None = None,
        loss_scale: float | None = None,
        extra_losses: Sequence[Losses] = (),
        closure: Closure | None = None,
    ) -> StepInfo:
        """``method.backward(losses, model, output)``; ``extra_losses`` holds the other batches'
        losses for methods with ``batches_per_step > 1``; ``closure`` re-runs the model on the
        step's batch for methods with ``needs_closure`` (F-MTL)::

            info = driver.backward(losses, out, closure=lambda: (tasks.losses(model(x), y), None))
        """
        return self.method.backward(
            losses, self.model, output, loss_scale=loss_scale, extra_losses=extra_losses, closure=closure
        )

    def after_step(self, losses: Callable[[], Losses] | Losses) -> None:
        """Pass the post-step losses (a callable is evaluated only when the method needs them)."""
        if Hook.AFTER_STEP not in self.method.hooks:
            return
        with torch.no_grad():
            self.method.after_step(losses() if callable(losses) else losses)


def add_param_groups(optimizer: torch.optim.Optimizer, groups: list[dict]) -> None:
    """Add a method's parameter groups, skipping parameters the optimiser already holds."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for group in groups:
        params: list[Tensor] = [p for p in group["params"] if id(p) not in held]
        if params:
            optimizer.add_param_group({**group, "params": params})
