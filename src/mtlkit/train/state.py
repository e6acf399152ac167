"""What a Trainer checkpoint holds besides the model weights, and restoring it all-or-nothing.

``state.pt`` (read with ``torch.load(weights_only=True)``) holds: the optimiser, scheduler and
GradScaler states, the method's ``state_dict()`` (which records the method's class, declared
configuration and tasks, and refuses to load into another), the RNG states, the loop counters,
the running epoch loss sum, the history, every callback's state, the task names and versions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from mtlkit.errors import CheckpointError
from mtlkit.train.checkpoint import (
    LoadedCheckpoint,
    apply_model_tensors,
    model_tensors,
    rng_state,
    set_rng_state,
)
from mtlkit.version import __version__

if TYPE_CHECKING:
    from mtlkit.train.trainer import Trainer


@dataclass
class Counters:
    """Where the loop is: optimiser steps, finished epochs, batches done in the current epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    stopped: bool = False


def collect_state(trainer: Trainer) -> dict[str, Any]:
    """The training state of ``trainer`` for ``state.pt``."""
    return {
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "scaler": trainer.precision.scaler.state_dict() if trainer.precision.scaler is not None else None,
        "method": trainer.method.state_dict(),
        "rng": rng_state(),
        "counters": {
            "step": trainer.step,
            "epoch": trainer.epoch,
            "batch_in_epoch": trainer.batch_in_epoch,
            "stopped": trainer.stopped,
        },
        "epoch_loss_sum": trainer.epoch_loss_sum.detach().cpu()
        if trainer.epoch_loss_sum is not None
        else None,
        "writer": {"method": type(trainer.method).__name__, "optimizer": type(trainer.optimizer).__name__},
        "callbacks": {cb.key: cb.state_dict() for cb in trainer.callbacks},
        "history": trainer.history,
        "tasks": trainer.tasks.names,
        "mtlkit_version": __version__,
    }


def restore_state(trainer: Trainer, ckpt: LoadedCheckpoint) -> dict[str, Any]:
    """Apply a verified checkpoint to ``trainer``; return its RNG state (applied by the caller
    where the resumed epoch needs it). Everything is read and checked first; if applying still
    fails, every object is rolled back, so a bad checkpoint changes nothing."""
    state = ckpt.state
    try:
        c = state["counters"]
        counters = Counters(int(c["step"]), int(c["epoch"]), int(c["batch_in_epoch"]), bool(c.get("stopped")))
        rng = state["rng"]
        writer = dict(state.get("writer", {}))
        history = list(state.get("history", []))
        loss_sum = state.get("epoch_loss_sum")
        callbacks = dict(state.get("callbacks", {}))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"{ckpt.path} has an incomplete training state ({exc}); nothing was loaded."
        ) from exc
    if state.get("tasks") != trainer.tasks.names:
        raise CheckpointError(
            f"{ckpt.path} was written for tasks {state.get('tasks')}, not {trainer.tasks.names}."
        )
    if writer.get("optimizer", type(trainer.optimizer).__name__) != type(trainer.optimizer).__name__:
        raise CheckpointError(
            f"{ckpt.path} was written by a run with optimizer {writer['optimizer']}, this run uses "
            f"{type(trainer.optimizer).__name__}; use a fresh output directory or the same configuration."
        )
    snapshot = _snapshot(trainer)
    try:
        apply_model_tensors(trainer.model, ckpt.model, ckpt.path)
        trainer.optimizer.load_state_dict(state["optimizer"])
        if trainer.scheduler is not None and state.get("scheduler") is not None:
            trainer.scheduler.load_state_dict(state["scheduler"])
        if trainer.precision.scaler is not None and state.get("scaler"):
            trainer.precision.scaler.load_state_dict(state["scaler"])
        trainer.method.load_state_dict(state["method"])
        trainer.method.to(trainer.device)  # checkpointed method state is on the CPU
        for cb in trainer.callbacks:
            cb.load_state_dict(callbacks.get(cb.key, {}))
    except Exception as exc:
        _rollback(trainer, snapshot)
        if isinstance(exc, CheckpointError):
            raise CheckpointError(f"{ckpt.path}: {exc}") from exc
        raise CheckpointError(
            f"{ckpt.path} does not fit this run ({type(exc).__name__}: {exc}); nothing was loaded."
        ) from exc
    trainer.step, trainer.epoch = counters.step, counters.epoch
    trainer.batch_in_epoch, trainer.stopped = counters.batch_in_epoch, counters.stopped
    trainer.history = history
    trainer.epoch_loss_sum = loss_sum.to(trainer.device) if isinstance(loss_sum, Tensor) else None
    return rng


def _snapshot(trainer: Trainer) -> tuple[Any, ...]:
    return (
        model_tensors(trainer.model),
        copy.deepcopy(trainer.optimizer.state_dict()),
        copy.deepcopy(trainer.scheduler.state_dict()) if trainer.scheduler is not None else None,
        copy.deepcopy(trainer.precision.scaler.state_dict())
        if trainer.precision.scaler is not None
        else None,
        trainer.method.state_dict(),
        [copy.deepcopy(cb.state_dict()) for cb in trainer.callbacks],
        rng_state(),
    )


def _rollback(trainer: Trainer, snapshot: tuple[Any, ...]) -> None:
    model, optimizer, scheduler, scaler, method, callbacks, rng = snapshot
    apply_model_tensors(trainer.model, model)
    trainer.optimizer.load_state_dict(optimizer)
    if scheduler is not None and trainer.scheduler is not None:
        trainer.scheduler.load_state_dict(scheduler)
    if scaler is not None and trainer.precision.scaler is not None:
        trainer.precision.scaler.load_state_dict(scaler)
    trainer.method.load_state_dict(method)
    for cb, st in zip(trainer.callbacks, callbacks, strict=True):
        cb.load_state_dict(st)
    set_rng_state(rng)
