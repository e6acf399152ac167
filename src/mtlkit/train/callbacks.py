"""The Trainer's callback protocol: how it grows without edits to its loop.

A callback overrides the hooks it needs; the Trainer calls them in order for every callback.
Whatever :meth:`Callback.state_dict` returns (tensors and plain values) is written to each
checkpoint under the callback's :attr:`Callback.key` and restored on resume, so a callback's
state survives a killed run like the Trainer's own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mtlkit.methods import StepInfo
    from mtlkit.train.evaluate import EvaluationReport
    from mtlkit.train.trainer import Trainer


class Callback:
    """Base class of Trainer callbacks (every hook does nothing by default)."""

    @property
    def key(self) -> str:
        """Name of this callback's entry in a checkpoint (unique per Trainer)."""
        return type(self).__name__

    def on_fit_start(self, trainer: Trainer) -> None:
        """After a resume (if any), before the first epoch of :meth:`Trainer.fit`."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before the first batch of ``epoch`` (0-based; also when an epoch is resumed)."""

    def on_train_batch_start(self, trainer: Trainer, batch: Any) -> None:
        """Before a training step on ``batch`` (moved to the device), with the weights and the
        optimiser state of the step; whatever a callback changes here it must restore (TAG's
        lookahead)."""

    def on_step_end(self, trainer: Trainer, info: StepInfo) -> None:
        """After every optimiser step (``trainer.step`` already counts it)."""

    def on_epoch_end(
        self, trainer: Trainer, epoch: int, row: dict[str, float], report: EvaluationReport | None
    ) -> None:
        """After the epoch's validation: ``row`` holds the epoch's logged values (callbacks may
        add to it), ``report`` the validation report. Set ``trainer.stopped = True`` to stop after this epoch."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last epoch."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def check_callbacks(callbacks: Sequence[Any]) -> list[Callback]:
    out = []
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(
                f"Trainer callbacks must subclass mtlkit.train.Callback, got {type(cb).__name__}."
            )
        out.append(cb)
    keys = [cb.key for cb in out]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"Two callbacks share the checkpoint key(s) {dupes}; give them distinct keys.")
    return out
