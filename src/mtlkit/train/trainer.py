"""The Trainer: a device-agnostic multi-task training loop around any method and model.

The loop itself is small; what grows lives elsewhere: batch plumbing in :mod:`.batches`, devices
and mixed precision in :mod:`.device`, evaluation in :mod:`.evaluate`, the checkpoint file format
in :mod:`.checkpoint` and its contents in :mod:`.state`, and everything optional -- logging, early
stopping, your own additions -- in :class:`~mtlkit.train.callbacks.Callback` objects.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mtlkit.core.contract import check_parameter_split, forward_full, parameter_groups, unwrap
from mtlkit.core.distributed import barrier, is_ddp, process_rank
from mtlkit.core.tasks import Batch, TaskBatches, TaskLosses, TaskSet
from mtlkit.errors import CheckpointError, ConfigError, EmptyDataError, TaskError
from mtlkit.methods import Hook, Method, StepInfo, add_param_groups
from mtlkit.methods import create as create_method
from mtlkit.metrics import check_reference
from mtlkit.metrics.task_metrics import directions
from mtlkit.models.compiled import compile_parts
from mtlkit.train.batches import move_to, unpack_batch
from mtlkit.train.callbacks import Callback, check_callbacks
from mtlkit.train.checkpoint import (
    apply_model_tensors,
    load_checkpoint,
    model_tensors,
    resumable_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from mtlkit.train.device import AmpMode, Precision, resolve_device
from mtlkit.train.early_stopping import EarlyStopping
from mtlkit.train.evaluate import EvaluationReport, evaluate
from mtlkit.train.logging import LoggingCallback
from mtlkit.train.multi_input import multi_input_losses
from mtlkit.train.state import collect_state, restore_state
from mtlkit.version import __version__


class Trainer:
    """Trains a multi-task model with any mtlkit method.

    Args:
        model: a multi-task model (see :mod:`mtlkit.core.contract`); every trainable parameter
            must be shared or task-specific.
        tasks: the task set.
        method: a :class:`~mtlkit.methods.Method` or a registry name (default ``"ew"``). The
            Trainer runs its whole lifecycle: ``setup`` with the tasks and model, its own
            parameters into the optimiser (own learning rate, no weight decay), ``after_step``
            with the losses recomputed on the same batch, ``begin_epoch``/``on_epoch_end``.
        optimizer: a torch optimiser over the model's parameters (default Adam, lr 1e-3, over
            :func:`~mtlkit.core.contract.parameter_groups`: the model's own groups if it has them).
        scheduler: optional LR scheduler, stepped once per epoch.
        device: ``"auto"`` (CUDA, MPS, CPU), or any torch device.
        log_dir: where ``steps.csv``, ``epochs.csv``, TensorBoard events and ``run.json`` go.
        checkpoint_dir: where checkpoints go (default ``log_dir/checkpoints`` when ``log_dir`` is set).
        checkpoint_every: also checkpoint every N optimiser steps (an epoch end always checkpoints).
        keep_checkpoints: how many step checkpoints to keep.
        grad_clip: clip the total gradient norm of the model's parameters to this value.
        amp: ``False``, ``"bf16"`` (autocast, no scaler) or ``"fp16"`` (autocast + GradScaler; the
            method works on unscaled losses and gradients). ``True``: fp16 on CUDA, bf16 elsewhere.
        early_stopping: an :class:`~mtlkit.train.EarlyStopping` callback.
        callbacks: further :class:`~mtlkit.train.Callback` objects.
        reference: single-task results for Δm% at every validation (a report or a JSON path).
        seed: the data order of epoch ``e`` depends only on ``(seed, e)``, which makes resumption exact.

    Under ``torchrun`` with a ``DistributedDataParallel`` model every method is exact: the update
    equals one process's on the global batch (``docs/distributed.md``). Rank 0 alone writes
    checkpoints and logs; every rank reads the checkpoints.
        log_every: steps between logged rows (each logged step reads values back from the device).
        config: the resolved run configuration, written to ``run.json`` for reproducibility.
        compile: ``torch.compile`` the model's parts (:func:`~mtlkit.models.compile_parts`, so every
            method works) and the loss computation; ``True`` or a dict of ``torch.compile`` options.
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
        callbacks: Sequence[Callback] = (),
        reference: EvaluationReport | Mapping[str, Mapping[str, float]] | str | Path | None = None,
        seed: int = 0,
        progress: bool = True,
        log_every: int = 10,
        tensorboard: bool = True,
        config: Mapping[str, Any] | None = None,
        compile: bool | Mapping[str, Any] = False,
    ) -> None:
        if not isinstance(tasks, TaskSet):
            raise TaskError(f"tasks must be an mtlkit.TaskSet, got {type(tasks).__name__}.")
        check_parameter_split(model)
        _check_positive_int("checkpoint_every", checkpoint_every, allow_none=True)
        _check_positive_int("keep_checkpoints", keep_checkpoints)
        _check_positive_int("log_every", log_every)
        if grad_clip is not None and not (isinstance(grad_clip, (int, float)) and grad_clip > 0):
            raise ConfigError(f"grad_clip must be a number > 0 or None, got {grad_clip!r}.")
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.tasks = tasks
        self._task_losses = tasks.losses
        self._compiled = bool(compile)
        if compile:
            options = dict(compile) if isinstance(compile, Mapping) else {}
            compile_parts(unwrap(self.model), **options)
            # the targets are checked on the host first, so the compiled losses hold no host sync
            self._task_losses = tasks.compile_losses(**options)
        self.method = create_method(method) if isinstance(method, str) else method
        self.method.setup(tasks, model=self.model)  # learnable method parameters exist from here on
        self.method.to(self.device)
        self.optimizer = optimizer or torch.optim.Adam(parameter_groups(self.model, lr=1e-3))
        add_param_groups(self.optimizer, self.method.param_groups())
        self.scheduler = scheduler
        self.grad_clip = grad_clip
        self.precision = Precision(amp, self.device)
        if isinstance(reference, (str, Path)):
            reference = EvaluationReport.load(reference)
        self.reference = reference
        self.directions = directions(tasks)
        if reference is not None:
            check_reference(
                reference.metrics if isinstance(reference, EvaluationReport) else reference, self.directions
            )
        self.seed = seed
        self.progress = progress
        self.config = dict(config) if config else {}
        self.log_dir = Path(log_dir) if log_dir is not None else None
        if checkpoint_dir is None and self.log_dir is not None:
            checkpoint_dir = self.log_dir / "checkpoints"
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        self.early_stopping = early_stopping
        builtin: list[Callback] = []
        if early_stopping is not None:
            early_stopping.check(self)
            builtin.append(early_stopping)
        # logging last: what the other callbacks add to an epoch's row reaches epochs.csv; one
        # writer under DDP (every rank holds the same weights and global step statistics)
        self.is_main = process_rank() == 0
        logging = (
            [LoggingCallback(self.log_dir, log_every, tensorboard)]
            if self.log_dir is not None and self.is_main
            else []
        )
        self.callbacks = check_callbacks([*builtin, *callbacks, *logging])
        # Progress counters, saved in every checkpoint.
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: list[dict[str, float]] = []
        self.stopped = False  # set by a callback (early stopping) to stop after this epoch; saved
        self.epoch_loss_sum: Tensor | None = None  # running sum of this epoch's training losses
        self.last_info: StepInfo | None = None

    # -- one step -----------------------------------------------------------------------------------
    def _losses(
        self, batch: Batch | TaskBatches, host: Batch | TaskBatches | None = None
    ) -> tuple[TaskLosses, Any]:
        # range checks on the host copy (a CPU batch checks itself inside the eager loss)
        check = host is not None and (self.device.type != "cpu" or self._compiled)
        with self.precision.autocast():
            if isinstance(batch, TaskBatches):  # multi-input: one forward per task's batch
                if self.method.needs_representation:
                    raise ConfigError(
                        f"{self.method!r} reads the model's shared representation, but in multi-input "
                        "training each task reads its own inputs, so there is none; use a "
                        "parameter-level method (level='parameter')."
                    )
                hosts = host if check and isinstance(host, TaskBatches) else None
                losses, output = multi_input_losses(self.model, self.tasks, batch, hosts)
            else:
                output = forward_full(self.model, batch.inputs)
                if check and isinstance(host, Batch):
                    self.tasks.check_targets(host.targets, output.predictions, host.masks)
                losses = self._task_losses(output.predictions, batch.targets, batch.masks)
        if self.precision.dtype is not None:  # methods and their solvers work in float32/float64
            losses = losses.map(lambda v: v.float())
        return losses, output

    def train_step(self, batch: Any) -> StepInfo:
        """One optimiser step on ``batch``; returns the method's :class:`StepInfo`.

        A method that uses several independent batches per step (``batches_per_step = n > 1``:
        MoDo, SDMGrad with independent batches) takes a sequence of ``n`` batches here; ``fit``
        groups consecutive batches of the loader (an incomplete group at the end of an epoch is
        skipped).
        """
        n = self.method.batches_per_step
        group = list(batch) if n > 1 else [batch]
        if len(group) != n:
            raise ConfigError(
                f"{type(self.method).__name__} uses {n} batches per step; train_step got {len(group)}."
            )
        hosts = [unpack_batch(b) for b in group]
        moved = [move_to(h, self.device) for h in hosts]
        self.model.train()
        for cb in self.callbacks:
            cb.on_train_batch_start(self, moved[0])
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.precision.scaler
        with self._gradient_sync():
            losses, output = self._losses(moved[0], hosts[0])
            extra = [self._losses(b, h)[0] for b, h in zip(moved[1:], hosts[1:], strict=True)]
            batch = moved[0]
            scale = None
            if scaler is not None:
                losses = losses.map(scaler.scale)
                extra = [e.map(scaler.scale) for e in extra]
                scale = float(scaler.get_scale())
            closure = self._closure(batch) if self.method.needs_closure else None
            info = self.method.backward(
                losses, self.model, output, loss_scale=scale, extra_losses=extra, closure=closure
            )
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        if Hook.AFTER_STEP in self.method.hooks:
            with torch.no_grad():
                self.method.after_step(self._losses(batch)[0])
        self.last_info = info
        return info

    def _gradient_sync(self) -> AbstractContextManager[Any]:
        """Under DDP, methods other than loss weightings average the gradients themselves: their
        forward and backward run with DDP's reducer off."""
        if is_ddp(self.model) and not self.method.ddp_native:
            return self.model.no_sync()  # type: ignore[operator]
        return nullcontext()

    def _closure(self, batch: Batch | TaskBatches) -> Callable[[], tuple[TaskLosses, Any]]:
        """The forward pass on ``batch`` again, scaled like the step's losses (F-MTL's perturbed
        passes)."""
        scaler = self.precision.scaler

        def closure() -> tuple[TaskLosses, Any]:
            losses, output = self._losses(batch)
            return (losses.map(scaler.scale) if scaler is not None else losses), output

        return closure

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
        _check_positive_int("epochs", epochs, allow_zero=True)
        if self.early_stopping is not None and val_loader is None:
            raise ConfigError("early_stopping needs a val_loader to monitor.")
        if hasattr(train_loader, "__len__") and len(train_loader) == 0:  # type: ignore[arg-type]
            raise EmptyDataError(
                "The training loader has no batch (empty dataset, or batch_size larger "
                "than the data with drop_last=True); nothing was trained or written."
            )
        resume_rng = self._resume() if resume and self.checkpoint_dir is not None else None
        for cb in self.callbacks:
            cb.on_fit_start(self)
        while self.epoch < epochs and not self.stopped:
            self._run_epoch(train_loader, val_loader, epochs, resume_rng)
            resume_rng = None
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return self.history

    def _epoch_batches(self, loader: Iterable[Any], resume_rng: dict[str, Any] | None) -> Iterator[Any]:
        epoch = self.epoch
        if resume_rng is not None and not self.batch_in_epoch:  # numpy/python streams go on exactly
            set_rng_state(resume_rng)
        torch.manual_seed(self._epoch_seed(epoch))  # data order depends only on (seed, epoch)
        set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
        if callable(set_epoch):  # DistributedSampler: its shuffle depends on (its seed, epoch)
            set_epoch(epoch)
        generator = getattr(loader, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(self._epoch_seed(epoch))
        iterator: Iterator[Any] = iter(loader)
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
        return iterator

    def _run_epoch(
        self,
        loader: Iterable[Any],
        val_loader: Iterable[Any] | None,
        epochs: int,
        resume_rng: dict[str, Any] | None,
    ) -> None:
        epoch, skip = self.epoch, self.batch_in_epoch
        batches = self._epoch_batches(loader, resume_rng)
        total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        bar = tqdm(
            batches,
            total=total,
            initial=skip,
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=True if not self.progress else None,  # None: off when not a terminal
            leave=False,
        )
        self.method.begin_epoch()
        try:
            for cb in self.callbacks:
                cb.on_epoch_start(self, epoch)
            per_step = self.method.batches_per_step
            for group in _groups(bar, per_step):
                info = self.train_step(group[0] if per_step == 1 else group)
                self.step += 1
                self.batch_in_epoch += per_step
                self.epoch_loss_sum = (
                    info.losses if self.epoch_loss_sum is None else self.epoch_loss_sum + info.losses
                )
                for cb in self.callbacks:
                    cb.on_step_end(self, info)
                if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
        except BaseException:
            self.method.abort_epoch()  # the epoch did not complete: it runs again on resume
            raise
        if self.batch_in_epoch == 0:
            self.method.abort_epoch()
            per_step = self.method.batches_per_step
            raise EmptyDataError(
                f"The training loader yielded no batch in epoch {epoch + 1}; nothing was written."
                if per_step == 1
                else f"The training loader yielded fewer than the {per_step} batches that one step of "
                f"{type(self.method).__name__} uses in epoch {epoch + 1}; nothing was written."
            )
        row: dict[str, float] = {}
        if self.epoch_loss_sum is not None:
            means = (self.epoch_loss_sum / self.batch_in_epoch).tolist()
            row.update({f"train/{t}/loss": v for t, v in zip(self.tasks.names, means, strict=True)})
        self.method.on_epoch_end()
        if self.scheduler is not None:
            self.scheduler.step()
        report = None
        if val_loader is not None:
            report = self.evaluate(val_loader)
            row.update(report.flat("val/"))
        row["lr"] = self.learning_rate()
        for cb in self.callbacks:
            cb.on_epoch_end(self, epoch, row, report)
        self.history.append(row)
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_loss_sum = None
        self.save_checkpoint(end_of_epoch=True)

    def _epoch_seed(self, epoch: int) -> int:
        return (self.seed * 1_000_003 + epoch) % (2**63 - 1)

    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- evaluation -------------------------------------------------------------------------------------
    def evaluate(
        self,
        loader: Iterable[Any],
        reference: EvaluationReport | Mapping[str, Mapping[str, float]] | str | Path | None = None,
    ) -> EvaluationReport:
        """Per-task metrics and losses over ``loader``; Δm% against ``reference`` (or the Trainer's)."""
        ref = reference if reference is not None else self.reference
        return evaluate(self.model, self.tasks, loader, self.device, self.precision, ref)

    # -- checkpoints -------------------------------------------------------------------------------------
    def save_checkpoint(self, end_of_epoch: bool = False) -> Path | None:
        """Write a checkpoint of everything needed to continue exactly (atomically)."""
        if self.checkpoint_dir is None:
            return None
        name = f"step-{self.step:08d}" + ("-end" if end_of_epoch else "")
        path = None
        if self.is_main:  # under DDP every rank holds the same state; rank 0 writes it
            path = save_checkpoint(
                self.checkpoint_dir, name, self.model, collect_state(self), keep=self.keep_checkpoints
            )
        barrier()  # no rank reads a checkpoint before it is complete
        return path if path is not None else self.checkpoint_dir / name

    def save_best_checkpoint(self) -> None:
        """Write the ``best`` checkpoint (early stopping calls this on an improvement)."""
        if self.checkpoint_dir is not None:
            name = f"best-{self.step:08d}"
            if self.is_main:
                save_checkpoint(
                    self.checkpoint_dir, name, self.model, collect_state(self), keep=1, pointer="best"
                )
            barrier()

    def best_checkpoint_tensors(self) -> dict[str, Tensor] | None:
        """The model weights of the ``best`` checkpoint (``None`` when there is none or it is
        unreadable, with a warning)."""
        if self.checkpoint_dir is None:
            return None
        try:
            best, note = resumable_checkpoint(self.checkpoint_dir, "best")
        except CheckpointError as exc:
            warnings.warn(
                f"The best checkpoint cannot be read ({exc}); the best weights are not restored.",
                stacklevel=2,
            )
            return None
        if note:
            warnings.warn(note, stacklevel=2)
        return best.model if best is not None else None

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model, optimiser, scheduler, method, callbacks, counters and RNG states from ``path``."""
        set_rng_state(restore_state(self, load_checkpoint(Path(path))))

    def _resume(self) -> dict[str, Any] | None:
        assert self.checkpoint_dir is not None
        ckpt, note = resumable_checkpoint(self.checkpoint_dir)
        if note:
            warnings.warn(note, stacklevel=3)
        return restore_state(self, ckpt) if ckpt is not None else None

    def model_tensors(self) -> dict[str, Tensor]:
        return model_tensors(self.model)

    def load_model_tensors(self, tensors: dict[str, Tensor], source: str) -> None:
        apply_model_tensors(self.model, tensors, source)

    def run_record(self) -> dict[str, Any]:
        """What ``run.json`` records: versions, seed, device, tasks, the method's declared
        configuration, the model, optimiser and the resolved run configuration."""
        return {
            "mtlkit_version": __version__,
            "torch_version": torch.__version__,
            "seed": self.seed,
            "device": str(self.device),
            "tasks": self.tasks.names,
            "method": {"class": type(self.method).__name__, "options": self.method.config()},
            "model": type(unwrap(self.model)).__name__,
            "optimizer": type(self.optimizer).__name__,
            "grad_clip": self.grad_clip,
            "amp": str(self.precision.dtype),
            "early_stopping": self.early_stopping.config() if self.early_stopping else None,
            "config": self.config,
        }


def _groups(batches: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive groups of ``size`` batches (an incomplete last group is dropped)."""
    group: list[Any] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def _check_positive_int(name: str, value: Any, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(
            f"{name} must be an integer >= {low}{' or None' if allow_none else ''}, got {value!r}."
        )
