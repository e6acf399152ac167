"""The Trainer: a device-agnostic multi-task training loop around any method and model."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import mtlkit
from mtlkit.core.tasks import Batch, TaskLosses, TaskSet
from mtlkit.errors import CheckpointError, ConfigError, TaskError, unknown_name
from mtlkit.methods import Method, StepInfo
from mtlkit.methods import create as create_method
from mtlkit.metrics import check_reference
from mtlkit.metrics.task_metrics import compute_metrics, directions, predictions_for
from mtlkit.train.checkpoint import (
    LoadedCheckpoint,
    apply_model_tensors,
    latest_checkpoint,
    load_checkpoint,
    model_tensors,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mtlkit.train.evaluate import EvaluationReport
from mtlkit.train.logging import RunLogger

AmpMode = Literal[False, "bf16", "fp16"] | bool


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then the CPU."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def move_to(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (inside a Batch, mappings, lists, tuples) on ``device``."""
    if isinstance(obj, Batch):
        return Batch(move_to(obj.inputs, device), move_to(obj.targets, device), move_to(obj.masks, device))
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


def unpack_batch(batch: Any) -> Batch:
    """Accept ``Batch``, ``(x, targets)``, ``(x, targets, masks)`` or a dict with those keys."""
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, Mapping) and "inputs" in batch and "targets" in batch:
        return Batch(batch["inputs"], dict(batch["targets"]), batch.get("masks"))
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3) and isinstance(batch[1], Mapping):
        return Batch(
            batch[0], dict(batch[1]), dict(batch[2]) if len(batch) == 3 and batch[2] is not None else None
        )
    raise TaskError(
        "A batch must be (inputs, {task: target}), (inputs, targets, {task: mask}), a dict with "
        f"'inputs' and 'targets', or mtlkit.Batch; got {type(batch).__name__}."
    )


@dataclass
class EarlyStopping:
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` evaluations.

    ``monitor`` names a validation value: ``"<task>/<metric>"``, ``"<task>/loss"``, ``"loss"``
    (sum of task losses) or ``"delta_m"``. ``mode="auto"`` takes the metric's direction.
    """

    monitor: str
    patience: int = 5
    min_delta: float = 0.0
    mode: Literal["auto", "max", "min"] = "auto"

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "max", "min"):
            raise ConfigError(f"early_stopping.mode must be 'auto', 'max' or 'min', got {self.mode!r}.")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ConfigError(f"early_stopping.patience must be an integer >= 1, got {self.patience!r}.")
        if self.min_delta < 0:
            raise ConfigError(f"early_stopping.min_delta must be >= 0, got {self.min_delta!r}.")


class Trainer:
    """Trains a multi-task model with any mtlkit method.

    Args:
        model: a multi-task model (``forward`` returns ``{task: output}``; see
            :class:`mtlkit.models.MultiTaskModel`).
        tasks: the task set.
        method: a :class:`~mtlkit.methods.Method` or a registry name (default ``"ew"``).
        optimizer: a torch optimiser over the model's parameters (default Adam, lr 1e-3). The
            method's own learnable parameters are added as a group without weight decay, with the
            method's learning rate where it has one (:meth:`~mtlkit.methods.Method.param_groups`).
        scheduler: optional LR scheduler, stepped once per epoch.
        device: ``"auto"`` (CUDA, MPS, CPU), or any torch device.
        log_dir: where ``steps.csv``, ``epochs.csv``, TensorBoard events and ``run.json`` go.
        checkpoint_dir: where checkpoints go (default ``log_dir/checkpoints`` when ``log_dir`` is set).
        checkpoint_every: also checkpoint every N optimiser steps (an epoch end always checkpoints).
        keep_checkpoints: how many step checkpoints to keep.
        grad_clip: clip the total gradient norm of the model's parameters to this value.
        amp: ``False``, ``"bf16"`` (autocast, no scaler) or ``"fp16"`` (autocast + GradScaler;
            gradients are unscaled before the method sees them). ``True`` picks fp16 on CUDA and
            bf16 elsewhere.
        early_stopping: an :class:`EarlyStopping` rule on the validation results.
        reference: single-task results for Δm% at every validation (a report or a JSON path).
        seed: the data order of epoch ``e`` depends only on ``(seed, e)``, which makes resumption exact.
        log_every: steps between logged rows (each logged step reads values back from the device).
        restore_best: with early stopping, load the best weights at the end of :meth:`fit`.
        config: the resolved run configuration, written to ``run.json`` for reproducibility.
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: TaskSet,
        method: Method | str = "ew",
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        *,
        device: str | torch.device | None = "auto",
        log_dir: str | Path | None = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int | None = None,
        keep_checkpoints: int = 2,
        grad_clip: float | None = None,
        amp: AmpMode = False,
        early_stopping: EarlyStopping | None = None,
        reference: EvaluationReport | Mapping[str, Mapping[str, float]] | str | Path | None = None,
        seed: int = 0,
        progress: bool = True,
        log_every: int = 10,
        tensorboard: bool = True,
        restore_best: bool = True,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(tasks, TaskSet):
            raise TaskError(f"tasks must be an mtlkit.TaskSet, got {type(tasks).__name__}.")
        if not callable(getattr(model, "shared_parameters", None)):
            raise TaskError(
                f"{type(model).__name__} has no shared_parameters(): a multi-task model returns "
                "{task: output} and names its shared parameters (see mtlkit.models.MultiTaskModel)."
            )
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.tasks = tasks
        if isinstance(method, str):
            method = (
                create_method(method, weights=tasks.weights)
                if method.lower() == "ew"
                else create_method(method)
            )
        method.setup(tasks.names, model=self.model)  # learnable method parameters exist from here on
        self.method = method.to(self.device)
        self.optimizer = optimizer or torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self._add_method_parameters()
        self.scheduler = scheduler
        self.grad_clip = grad_clip
        self.amp_dtype, self.scaler = self._amp(amp)
        self.early_stopping = early_stopping
        if isinstance(reference, (str, Path)):
            reference = EvaluationReport.load(reference)
        self.reference = reference
        self.directions = directions(tasks)
        if reference is not None:
            check_reference(
                reference.metrics if isinstance(reference, EvaluationReport) else reference, self.directions
            )
        if early_stopping is not None:
            known = {f"{t}/{m}" for t, ms in self.directions.items() for m in ms} | {
                f"{t}/loss" for t in tasks.names
            }
            known |= {"loss"} | ({"delta_m"} if reference is not None else set())
            if early_stopping.monitor not in known:
                raise unknown_name("early_stopping.monitor", early_stopping.monitor, known)
        self.seed = seed
        self.progress = progress
        self.log_every = max(1, int(log_every))
        self.restore_best = restore_best
        self.log_dir = Path(log_dir) if log_dir is not None else None
        if checkpoint_dir is None and self.log_dir is not None:
            checkpoint_dir = self.log_dir / "checkpoints"
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        self.logger = RunLogger(self.log_dir, tensorboard=tensorboard) if self.log_dir is not None else None
        self.config = dict(config) if config else {}
        # Progress counters, saved in every checkpoint.
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: list[dict[str, float]] = []
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.stopped = False  # early stopping fired; a resumed run does not train on
        self._loss_sum: Tensor | None = None  # running sum of this epoch's training losses
        self._best_weights: dict[str, Tensor] | None = None
        self.last_info: StepInfo | None = None

    # -- set-up helpers -----------------------------------------------------------------------------
    def _add_method_parameters(self) -> None:
        """Add the method's own parameters (UW's log-variances, ...) to the optimiser: their own
        learning rate when the method sets one, never weight decay."""
        in_opt = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        for group in self.method.param_groups():
            params = [p for p in group["params"] if id(p) not in in_opt]
            if params:
                self.optimizer.add_param_group({**group, "params": params})

    def _amp(self, amp: AmpMode) -> tuple[torch.dtype | None, Any]:
        if amp is False or amp is None:
            return None, None
        if amp is True:
            amp = "fp16" if self.device.type == "cuda" else "bf16"
        if amp == "bf16":
            return torch.bfloat16, None
        if amp == "fp16":
            return torch.float16, torch.amp.GradScaler(self.device.type)
        raise ConfigError(f"amp must be False, True, 'bf16' or 'fp16', got {amp!r}.")

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _epoch_seed(self, epoch: int) -> int:
        return (self.seed * 1_000_003 + epoch) % (2**63 - 1)

    # -- one step -----------------------------------------------------------------------------------
    def _losses(self, batch: Batch) -> TaskLosses:
        with self._autocast():
            outputs = self.model(batch.inputs)
            losses = self.tasks.losses(outputs, batch.targets, batch.masks)
        if self.amp_dtype is not None:  # methods and their solvers work in float32/float64
            fl = TaskLosses({k: v.float() for k, v in losses.items()})
            fl.labelled = losses.labelled
            losses = fl
        return losses

    def train_step(self, batch: Any) -> StepInfo:
        """One optimiser step on ``batch``; returns the method's :class:`StepInfo`."""
        batch = move_to(unpack_batch(batch), self.device)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses = self._losses(batch)
        scale = None
        if self.scaler is not None:
            scaled = TaskLosses(zip(losses, self.scaler.scale(list(losses.values())), strict=True))
            scale = float(self.scaler.get_scale())
            scaled.labelled = losses.labelled
            losses = scaled
        info = self.method.backward(
            losses,
            shared=self.model.shared_parameters(),
            features=getattr(self.model, "last_features", None),
            task_specific=self.model.task_parameters() if hasattr(self.model, "task_parameters") else None,
            loss_scale=scale,
        )
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if "post_step_losses" in self.method.hooks:
            with torch.no_grad():
                self.method.after_step(self._losses(batch))
        self.last_info = info
        return info

    # -- the loop -------------------------------------------------------------------------------------
    def fit(
        self,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None = None,
        epochs: int = 1,
        resume: bool = True,
    ) -> list[dict[str, float]]:
        """Train for ``epochs`` epochs (resuming from the latest checkpoint when one exists).

        Returns the per-epoch history: mean training losses and validation results.
        """
        if self.early_stopping is not None and val_loader is None:
            raise ConfigError("early_stopping needs a val_loader to monitor.")
        resume_rng = None
        if resume and self.checkpoint_dir is not None:
            path = latest_checkpoint(self.checkpoint_dir)
            if path is not None:
                resume_rng = self._restore(load_checkpoint(path))
        self._write_run_json(epochs)
        while self.epoch < epochs and not self.stopped:
            epoch = self.epoch
            torch.manual_seed(self._epoch_seed(epoch))  # data order depends only on (seed, epoch)
            generator = getattr(train_loader, "generator", None)
            if isinstance(generator, torch.Generator):
                generator.manual_seed(self._epoch_seed(epoch))
            iterator: Iterator[Any] = iter(train_loader)
            skip = self.batch_in_epoch
            for done in range(skip):  # resuming mid-epoch: the same order, minus the batches done
                try:
                    next(iterator)
                except StopIteration:
                    raise CheckpointError(
                        f"The checkpoint was written after batch {skip} of epoch {epoch + 1}, but the "
                        f"training data has only {done} batches: resume with the same data and batch size."
                    ) from None
            if skip and resume_rng is not None:
                set_rng_state(resume_rng)
            resume_rng = None
            total = len(train_loader) if hasattr(train_loader, "__len__") else None
            bar = tqdm(
                iterator,
                total=total,
                initial=skip,
                desc=f"epoch {epoch + 1}/{epochs}",
                disable=True if not self.progress else None,  # None: off when not a terminal
                leave=False,
            )
            for batch in bar:
                info = self.train_step(batch)
                self.step += 1
                self.batch_in_epoch += 1
                self._loss_sum = info.losses if self._loss_sum is None else self._loss_sum + info.losses
                if self.step % self.log_every == 0:
                    self._log_step(info, bar)
                if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
            row: dict[str, float] = {}
            if self._loss_sum is not None:
                means = (self._loss_sum / self.batch_in_epoch).tolist()
                row.update({f"train/{t}/loss": v for t, v in zip(self.tasks.names, means, strict=True)})
            if "epoch_end" in self.method.hooks:
                self.method.on_epoch_end()
            if self.scheduler is not None:
                self.scheduler.step()
            if val_loader is not None:
                report = self.evaluate(val_loader)
                row.update(report.flat("val/"))
                self.stopped = self._early_stopping_update(report, epoch)
            row["lr"] = float(self.optimizer.param_groups[0]["lr"])
            self.history.append(row)
            if self.logger is not None:
                self.logger.log_epoch(epoch + 1, self.step, row)
            self.epoch += 1
            self.batch_in_epoch = 0
            self._loss_sum = None
            self.save_checkpoint(end_of_epoch=True)
        if self.restore_best and self.early_stopping is not None and self._best_weights is not None:
            apply_model_tensors(self.model, self._best_weights, "best weights")
        if self.logger is not None:
            self.logger.close()
        return self.history

    def _log_step(self, info: StepInfo, bar: Any) -> None:
        scalars = info.scalars()
        scalars["lr"] = float(self.optimizer.param_groups[0]["lr"])
        bar.set_postfix({"loss": f"{sum(v for k, v in scalars.items() if k.startswith('loss/')):.4f}"})
        if self.logger is not None:
            self.logger.log_step(self.step, self.epoch + 1, scalars)

    def _monitor_value(self, report: EvaluationReport) -> tuple[float, bool]:
        rule = self.early_stopping
        assert rule is not None
        if rule.monitor == "loss":
            value, higher = sum(report.losses.values()), False
        elif rule.monitor == "delta_m":
            value, higher = report.delta_m if report.delta_m is not None else math.nan, True
        else:
            value = report.flat()[rule.monitor]
            task, _, metric = rule.monitor.partition("/")
            higher = self.directions[task].get(metric, False)  # "<task>/loss": lower is better
        if rule.mode != "auto":
            higher = rule.mode == "max"
        return value, higher

    def _early_stopping_update(self, report: EvaluationReport, epoch: int) -> bool:
        if self.early_stopping is None:
            return False
        value, higher = self._monitor_value(report)
        better = self.best_value is None or (
            value > self.best_value + self.early_stopping.min_delta
            if higher
            else value < self.best_value - self.early_stopping.min_delta
        )
        if better and not math.isnan(value):
            self.best_value, self.best_epoch, self.bad_epochs = value, epoch + 1, 0
            self._best_weights = model_tensors(self.model)
            if self.checkpoint_dir is not None:
                name = f"best-{self.step:08d}"
                save_checkpoint(self.checkpoint_dir, name, self.model, self._state(), keep=1, pointer="best")
            return False
        self.bad_epochs += 1
        return self.bad_epochs >= self.early_stopping.patience

    # -- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(
        self, loader: Iterable[Any]
    ) -> tuple[
        dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float], dict[str, int]
    ]:
        """Scores, targets, label masks, mean losses and label counts per task over ``loader``."""
        self.model.eval()
        scores: dict[str, list[np.ndarray]] = {t: [] for t in self.tasks.names}
        targets: dict[str, list[np.ndarray]] = {t: [] for t in self.tasks.names}
        masks: dict[str, list[np.ndarray]] = {t: [] for t in self.tasks.names}
        loss_sum = dict.fromkeys(self.tasks.names, 0.0)
        count = dict.fromkeys(self.tasks.names, 0)
        for raw in loader:
            batch = move_to(unpack_batch(raw), self.device)
            with self._autocast():
                outputs = self.model(batch.inputs)
                losses = self.tasks.losses(outputs, batch.targets, batch.masks)
            labelled = self.tasks.labelled_masks(batch.targets, batch.masks)
            counts = losses.labelled.tolist()
            for i, task in enumerate(self.tasks):
                name = task.name
                scores[name].append(predictions_for(task, outputs[name]).cpu().numpy())
                targets[name].append(batch.targets[task.target_key].float().cpu().numpy())
                masks[name].append(labelled[name].cpu().numpy())
                loss_sum[name] += float(losses[name]) * counts[i]
                count[name] += counts[i]
        cat = {t: np.concatenate(v) if v else np.zeros(0) for t, v in scores.items()}
        tgt = {t: np.concatenate(v) if v else np.zeros(0) for t, v in targets.items()}
        msk = {t: np.concatenate(v) if v else np.zeros(0, dtype=bool) for t, v in masks.items()}
        mean_loss = {t: (loss_sum[t] / count[t]) if count[t] else math.nan for t in self.tasks.names}
        return cat, tgt, msk, mean_loss, count

    def evaluate(
        self,
        loader: Iterable[Any],
        reference: EvaluationReport | Mapping[str, Mapping[str, float]] | str | Path | None = None,
    ) -> EvaluationReport:
        """Per-task metrics and losses over ``loader``; Δm% against ``reference`` (or the Trainer's)."""
        scores, targets, masks, losses, counts = self.predict(loader)
        metrics = {
            t.name: compute_metrics(t, scores[t.name], targets[t.name], masks[t.name]) for t in self.tasks
        }
        report = EvaluationReport(metrics, self.directions, losses, counts)
        reference = reference if reference is not None else self.reference
        if isinstance(reference, (str, Path)):
            reference = EvaluationReport.load(reference)
        if reference is not None:
            report.with_reference(reference)
        return report

    # -- checkpoints -------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "method": self.method.state_dict(),
            "rng": rng_state(),
            "counters": {
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "stopped": self.stopped,
            },
            "epoch_loss_sum": self._loss_sum.detach().cpu() if self._loss_sum is not None else None,
            "writer": {"method": type(self.method).__name__, "optimizer": type(self.optimizer).__name__},
            "early_stopping": {
                "best_value": self.best_value,
                "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs,
            },
            "history": self.history,
            "tasks": self.tasks.names,
            "mtlkit_version": mtlkit.__version__,
        }

    def save_checkpoint(self, end_of_epoch: bool = False) -> Path | None:
        """Write a checkpoint of everything needed to continue exactly (atomically)."""
        if self.checkpoint_dir is None:
            return None
        name = f"step-{self.step:08d}" + ("-end" if end_of_epoch else "")
        return save_checkpoint(
            self.checkpoint_dir, name, self.model, self._state(), keep=self.keep_checkpoints
        )

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model, optimiser, scheduler, method, counters and RNG states from ``path``."""
        self._restore(load_checkpoint(Path(path)))

    def _restore(self, ckpt: LoadedCheckpoint) -> dict[str, Any]:
        """Apply a verified checkpoint. Everything is read and checked first; if applying still
        fails, every object is rolled back, so a bad checkpoint changes nothing."""
        state = ckpt.state
        try:
            counters = state["counters"]
            step, epoch, batch_in_epoch = (
                int(counters["step"]),
                int(counters["epoch"]),
                int(counters["batch_in_epoch"]),
            )
            stopped = bool(counters.get("stopped", False))
            rng = state["rng"]
            writer = state.get("writer", {})
            es = state.get("early_stopping", {})
            history = list(state.get("history", []))
            loss_sum = state.get("epoch_loss_sum")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(
                f"{ckpt.path} has an incomplete training state ({exc}); nothing was loaded."
            ) from exc
        if state.get("tasks") != self.tasks.names:
            raise CheckpointError(
                f"{ckpt.path} was written for tasks {state.get('tasks')}, not {self.tasks.names}."
            )
        mine = {"method": type(self.method).__name__, "optimizer": type(self.optimizer).__name__}
        for key, name in mine.items():
            if writer.get(key, name) != name:
                raise CheckpointError(
                    f"{ckpt.path} was written by a run with {key} {writer[key]}, this run uses {name}; "
                    "use a fresh output directory or the same configuration."
                )
        best = None
        best_path = (
            latest_checkpoint(self.checkpoint_dir, "best") if self.checkpoint_dir is not None else None
        )
        if self.early_stopping is not None and best_path is not None:
            best = load_checkpoint(best_path).model
        snapshot = (
            model_tensors(self.model),
            copy.deepcopy(self.optimizer.state_dict()),
            copy.deepcopy(self.scheduler.state_dict()) if self.scheduler is not None else None,
            copy.deepcopy(self.scaler.state_dict()) if self.scaler is not None else None,
            copy.deepcopy(self.method.state_dict()),
            rng_state(),
        )
        try:
            apply_model_tensors(self.model, ckpt.model, ckpt.path)
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state.get("scheduler") is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.method.load_state_dict(state["method"])
            self.method.to(self.device)  # checkpointed method state is on the CPU
            set_rng_state(rng)
        except Exception as exc:
            apply_model_tensors(self.model, snapshot[0])
            self.optimizer.load_state_dict(snapshot[1])
            if snapshot[2] is not None:
                self.scheduler.load_state_dict(snapshot[2])
            if snapshot[3] is not None:
                self.scaler.load_state_dict(snapshot[3])
            self.method.load_state_dict(snapshot[4])
            set_rng_state(snapshot[5])
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(
                f"{ckpt.path} does not fit this run ({type(exc).__name__}: {exc}); nothing was loaded."
            ) from exc
        self.step, self.epoch, self.batch_in_epoch, self.stopped = step, epoch, batch_in_epoch, stopped
        self.best_value, self.best_epoch, self.bad_epochs = (
            es.get("best_value"),
            es.get("best_epoch"),
            es.get("bad_epochs", 0),
        )
        self.history = history
        self._loss_sum = loss_sum.to(self.device) if loss_sum is not None else None
        self._best_weights = best
        if self.logger is not None:
            self.logger.resume_from(self.step, self.epoch)
        return rng

    def _write_run_json(self, epochs: int) -> None:
        if self.logger is None:
            return
        self.logger.write_json(
            "run.json",
            {
                "mtlkit_version": mtlkit.__version__,
                "torch_version": torch.__version__,
                "seed": self.seed,
                "epochs": epochs,
                "device": str(self.device),
                "tasks": self.tasks.names,
                "method": repr(self.method),
                "model": type(self.model).__name__,
                "optimizer": type(self.optimizer).__name__,
                "grad_clip": self.grad_clip,
                "amp": str(self.amp_dtype),
                "early_stopping": asdict(self.early_stopping) if self.early_stopping else None,
                "config": self.config,
            },
        )
