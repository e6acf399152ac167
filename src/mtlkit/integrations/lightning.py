"""PyTorch Lightning: any mtlkit model and method in a ``lightning.Trainer``.

:class:`MultiTaskLightningModule` wraps a multi-task model, its :class:`~mtlkit.TaskSet` and a
method. Lightning runs the loop (devices, precision, logging, checkpoints, callbacks); the module
runs the method's whole lifecycle, so any method trains under Lightning exactly as in mtlkit's
Trainer: ``setup`` before the optimiser is built and the method's learnable parameters in it, the
per-step ``backward``, ``after_step`` for the methods that need the post-step losses, the
re-evaluation closure for F-MTL, and ``begin_epoch`` / ``on_epoch_end`` around every epoch.

Optimisation is manual (``automatic_optimization = False``): the method is the backward. It takes
the per-task gradients from mtlkit's engine and writes ``.grad`` itself, so Lightning's
``manual_backward`` (one scalar loss) is not called; Lightning's precision still applies: under
``"bf16-mixed"`` the forward passes run in Lightning's autocast and the method in full precision, and under ``"16-mixed"`` the losses are
scaled by Lightning's ``GradScaler`` and the method is told the scale (as mtlkit's Trainer does), so
Lightning's optimiser step unscales, skips overflowing steps and updates the scale as usual.

Single-process strategies only: a multi-process strategy (DDP, FSDP, DeepSpeed) would need the
method's reductions inside Lightning's communication, which is not built; it is refused with an
error. For data-parallel multi-task training, run mtlkit's Trainer under ``torchrun``, where every
method is exact.

Needs the ``lightning`` extra (``pip install "mtlkit[lightning]"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from mtlkit.core.contract import forward_full
from mtlkit.core.tasks import Batch, TaskLosses, TaskSet, unpack_batch
from mtlkit.errors import ConfigError
from mtlkit.methods import Hook, Method, add_param_groups
from mtlkit.methods import create as create_method
from mtlkit.train.batches import move_to

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class MultiTaskLightningModule(L.LightningModule):
    """A ``LightningModule`` that trains ``model`` on ``tasks`` with ``method``.

    Args:
        model: an mtlkit multi-task model (any module with the model contract).
        tasks: the task set.
        method: a method or its registry name (``"ew"`` by default).
        optimizer: ``params -> optimizer`` (default Adam, lr 1e-3); the method's own learnable
            parameters are added to it as their own groups.
        scheduler: optional ``optimizer -> LR scheduler``, stepped once per epoch.

    Logged per step (``on_step``) and per epoch: ``train/loss/<task>``, ``train/weight/<task>``
    (the method's effective weights, when it has them), and ``val/loss/<task>`` in validation.
    Batches are anything mtlkit's Trainer takes (``mk.Batch``, ``(x, targets)``,
    ``(x, targets, masks)``). The method's state is part of the module, so Lightning's checkpoints
    carry it and a resumed run continues the method where it stopped.
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: TaskSet,
        method: Method | str = "ew",
        optimizer: OptimizerFactory | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(tasks, TaskSet):
            raise ConfigError(f"tasks must be an mtlkit.TaskSet, got {type(tasks).__name__}.")
        self.model = model
        self.tasks = tasks
        self.method: Method = create_method(method) if isinstance(method, str) else method
        if self.method.batches_per_step > 1:
            raise ConfigError(
                f"{type(self.method).__name__} uses {self.method.batches_per_step} batches per step, which a "
                "LightningModule's training_step does not see; use mtlkit's Trainer or Driver for it."
            )
        self.method.setup(tasks, model=model)  # before the optimiser: its parameters exist from here on
        self.automatic_optimization = False
        self._optimizer_factory = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3))
        self._scheduler_factory = scheduler
        self._in_epoch = False

    # -- Lightning's hooks -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        world = getattr(self.trainer, "world_size", 1)
        if world > 1:
            raise ConfigError(
                f"MultiTaskLightningModule runs single-process strategies only (this run has {world} "
                "processes); for data-parallel multi-task training use mtlkit's Trainer under torchrun."
            )

    def configure_optimizers(self) -> Any:
        optimizer = self._optimizer_factory(self.model.parameters())
        add_param_groups(optimizer, self.method.param_groups())
        if self._scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self._scheduler_factory(optimizer), "interval": "epoch"},
        }

    def forward(self, x: Any) -> dict[str, torch.Tensor]:
        return self.model(x)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return move_to(unpack_batch(batch), device)

    def on_train_epoch_start(self) -> None:
        if Hook.EPOCH_END in self.method.hooks:
            self.method.begin_epoch()
            self._in_epoch = True

    def on_train_epoch_end(self) -> None:
        if self._in_epoch:
            self.method.on_epoch_end()
            self._in_epoch = False
        scheduler = self.lr_schedulers()
        if scheduler is not None and not isinstance(scheduler, list):
            scheduler.step()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        step_batch = self._batch(batch)
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list)
        optimizer.zero_grad(set_to_none=True)
        losses, output = self._losses(step_batch)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = None
        if scaler is not None:  # 16-mixed: the method sees scaled losses and is told the scale
            losses = losses.map(scaler.scale)
            scale = float(scaler.get_scale())
        closure = (lambda: self._losses(step_batch)) if self.method.needs_closure else None
        # Lightning runs the whole step under its autocast; the method's solvers and gradient
        # combinations run in full precision, as in mtlkit's Trainer (only forwards are autocast)
        with torch.autocast(self.device.type, enabled=False):
            info = self.method.backward(losses, self.model, output, loss_scale=scale, closure=closure)
        optimizer.step()
        if Hook.AFTER_STEP in self.method.hooks:
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                self.method.after_step(self._losses(step_batch)[0])
        values = info.scalars()
        batch_size = _batch_size(step_batch)
        self.log_dict(
            {f"train/{k}": v for k, v in values.items() if k.startswith(("loss/", "weight/"))},
            on_step=True,
            on_epoch=True,
            batch_size=batch_size,
        )

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        step_batch = self._batch(batch)
        losses, _ = self._losses(step_batch)
        self.log_dict(
            {f"val/loss/{name}": value.detach() for name, value in losses.items()},
            on_epoch=True,
            batch_size=_batch_size(step_batch),
        )

    # -- helpers -------------------------------------------------------------------------------------
    def _batch(self, batch: Any) -> Batch:
        unpacked = unpack_batch(batch)
        if not isinstance(unpacked, Batch):
            raise ConfigError(
                "MultiTaskLightningModule takes one batch for all tasks (multi-input batches: use mtlkit's Trainer)."
            )
        return unpacked

    def _losses(self, batch: Batch) -> tuple[TaskLosses, Any]:
        with self.trainer.precision_plugin.forward_context():  # Lightning's autocast, if any
            output = forward_full(self.model, batch.inputs)
            losses = self.tasks.losses(output.predictions, batch.targets, batch.masks)
        return losses.map(lambda v: v.float()), output


def _batch_size(batch: Batch) -> int:
    x = batch.inputs
    if isinstance(x, torch.Tensor):
        return int(x.shape[0])
    if isinstance(x, Mapping):
        first = next(iter(x.values()))
        return int(first.shape[0])
    return 1
