"""Run logs: CSV files (one row per logged step / per epoch) and TensorBoard scalars."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtlkit.core.contract import unwrap
from mtlkit.train.callbacks import Callback

if TYPE_CHECKING:
    from mtlkit.methods import StepInfo
    from mtlkit.train.evaluate import EvaluationReport
    from mtlkit.train.trainer import Trainer


class CSVLog:
    """An append-only CSV whose columns grow when new keys appear (the file is rewritten then)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.columns: list[str] = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                reader = csv.reader(f)
                self.columns = next(reader, [])

    def truncate_after(self, key: str, value: float) -> None:
        """Drop rows whose ``key`` exceeds ``value`` (rows a killed run wrote after its checkpoint)."""
        if not self.path.exists():
            return
        rows = self.read()
        kept = [r for r in rows if r.get(key, "") == "" or float(r[key]) <= value]
        if len(kept) != len(rows):
            self._rewrite(kept)

    def read(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)

    def append(self, row: Mapping[str, Any]) -> None:
        new = [k for k in row if k not in self.columns]
        if new:
            old_rows = self.read()
            self.columns += new
            self._rewrite(old_rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_header = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if write_header:
                writer.writeheader()
            writer.writerow(dict(row))


class RunLogger:
    """Writes ``steps.csv``, ``epochs.csv`` and TensorBoard event files under ``log_dir``."""

    def __init__(self, log_dir: Path, tensorboard: bool = True) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.steps = CSVLog(self.log_dir / "steps.csv")
        self.epochs = CSVLog(self.log_dir / "epochs.csv")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it is slow to import

            self._tb = SummaryWriter(log_dir=str(self.log_dir / "tensorboard"))

    def resume_from(self, step: int, epoch: int) -> None:
        self.steps.truncate_after("step", step)
        self.epochs.truncate_after("epoch", epoch)

    def log_step(self, step: int, epoch: int, scalars: Mapping[str, float]) -> None:
        self.steps.append({"step": step, "epoch": epoch, **scalars})
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"train/{k}", v, step)

    def log_epoch(self, epoch: int, step: int, scalars: Mapping[str, float]) -> None:
        self.epochs.append({"epoch": epoch, "step": step, **scalars})
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"epoch/{k}", v, epoch)

    def write_json(self, name: str, data: Any) -> None:
        (self.log_dir / name).write_text(json.dumps(data, indent=2, default=str))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def model_statistics(model: Any) -> dict[str, float]:
    """``model/<name>``: what the model reports about its last forward (gate weights, expert
    usage, attention masks; ``routing_statistics()``), so expert collapse shows in the logs."""
    stats = getattr(unwrap(model), "routing_statistics", None)
    return {f"model/{k}": float(v) for k, v in stats().items()} if callable(stats) else {}


class LoggingCallback(Callback):
    """Writes ``run.json`` at the start of :meth:`~mtlkit.train.Trainer.fit`, a ``steps.csv`` row
    every ``log_every`` steps (losses, weights, gradient norms and cosines, lr), an ``epochs.csv``
    row per epoch, and the same to TensorBoard. After a resume, rows written after the restored
    checkpoint (or every row, when the run restarts from scratch) are dropped first, so a killed
    and restarted run never logs a step twice."""

    def __init__(self, log_dir: Path, log_every: int = 10, tensorboard: bool = True) -> None:
        self.log_dir = Path(log_dir)
        self.log_every = max(1, int(log_every))
        self.tensorboard = tensorboard
        self.logger: RunLogger | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self.logger = RunLogger(self.log_dir, tensorboard=self.tensorboard)
        self.logger.resume_from(trainer.step, trainer.epoch)
        self.logger.write_json("run.json", trainer.run_record())

    def on_step_end(self, trainer: Trainer, info: StepInfo) -> None:
        if self.logger is None or trainer.step % self.log_every:
            return
        scalars = info.scalars()
        scalars["lr"] = trainer.learning_rate()
        scalars.update(model_statistics(trainer.model))
        self.logger.log_step(trainer.step, trainer.epoch + 1, scalars)

    def on_epoch_end(
        self, trainer: Trainer, epoch: int, row: dict[str, float], report: EvaluationReport | None
    ) -> None:
        if self.logger is not None:
            self.logger.log_epoch(epoch + 1, trainer.step, row)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None
