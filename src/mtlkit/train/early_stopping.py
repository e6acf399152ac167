"""Early stopping on a validation value, keeping the best weights."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor

from mtlkit.errors import ConfigError, unknown_name
from mtlkit.train.callbacks import Callback

if TYPE_CHECKING:
    from mtlkit.train.evaluate import EvaluationReport
    from mtlkit.train.trainer import Trainer


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` validations.

    ``monitor`` names a validation value: ``"<task>/<metric>"``, ``"<task>/loss"``, ``"loss"``
    (sum of task losses) or ``"delta_m"``. ``mode="auto"`` takes the metric's direction. The best
    weights are kept (and written as the ``best`` checkpoint when the Trainer checkpoints); with
    ``restore_best`` they are loaded into the model when :meth:`~mtlkit.train.Trainer.fit` ends.
    """

    def __init__(
        self,
        monitor: str,
        patience: int = 5,
        min_delta: float = 0.0,
        mode: Literal["auto", "max", "min"] = "auto",
        restore_best: bool = True,
    ) -> None:
        if mode not in ("auto", "max", "min"):
            raise ConfigError(f"early_stopping.mode must be 'auto', 'max' or 'min', got {mode!r}.")
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ConfigError(f"early_stopping.patience must be an integer >= 1, got {patience!r}.")
        if not isinstance(min_delta, (int, float)) or not min_delta >= 0:
            raise ConfigError(f"early_stopping.min_delta must be >= 0, got {min_delta!r}.")
        self.monitor, self.patience, self.min_delta, self.mode = monitor, patience, float(min_delta), mode
        self.restore_best = restore_best
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.best_weights: dict[str, Tensor] | None = None

    def config(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "mode": self.mode,
        }

    def check(self, trainer: Trainer) -> None:
        """Refuse a monitor name this run cannot produce (called by the Trainer)."""
        known = {f"{t}/{m}" for t, ms in trainer.directions.items() for m in ms}
        known |= {f"{t}/loss" for t in trainer.tasks.names} | {"loss"}
        known |= {"delta_m"} if trainer.reference is not None else set()
        if self.monitor not in known:
            raise unknown_name("early_stopping.monitor", self.monitor, known)

    def _value(self, trainer: Trainer, report: EvaluationReport) -> tuple[float, bool]:
        if self.monitor == "loss":
            value, higher = sum(report.losses.values()), False
        elif self.monitor == "delta_m":
            value, higher = report.delta_m if report.delta_m is not None else math.nan, True
        else:
            value = report.flat()[self.monitor]
            task, _, metric = self.monitor.partition("/")
            higher = trainer.directions[task].get(metric, False)  # "<task>/loss": lower is better
        if self.mode != "auto":
            higher = self.mode == "max"
        return value, higher

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.best_value is not None and self.best_weights is None:  # resumed: the best checkpoint
            self.best_weights = trainer.best_checkpoint_tensors()

    def on_epoch_end(
        self, trainer: Trainer, epoch: int, row: dict[str, float], report: EvaluationReport | None
    ) -> None:
        if report is None:
            return
        value, higher = self._value(trainer, report)
        best = self.best_value
        better = best is None or (value > best + self.min_delta if higher else value < best - self.min_delta)
        if better and not math.isnan(value):
            self.best_value, self.best_epoch, self.bad_epochs = value, epoch + 1, 0
            self.best_weights = trainer.model_tensors()
            trainer.save_best_checkpoint()
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            trainer.stopped = True

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.restore_best and self.best_weights is not None:
            trainer.load_model_tensors(self.best_weights, "best weights")

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_value = state.get("best_value")
        self.best_epoch = state.get("best_epoch")
        self.bad_epochs = int(state.get("bad_epochs", 0))
