"""Accumulated cross-loss similarity: the weight rule of Byzantine-resilient multi-task learning
(Li, Abbas, Koutsoukos, "Byzantine Resilient Distributed Multi-Task Learning", NeurIPS 2020) as a
relatedness measure of a centralised multi-task model.

``r_kl <- (1 - nu) r_kl + nu * L_k(prediction of task l's head; task k's targets)``: how well task
``l``'s predictor does on task ``k``'s data, exponentially averaged. The weights
``c_kl = (1/r_kl) / sum_{l' kept} (1/r_kl')`` over the kept sources ``{l : r_kl <= r_kk}`` (the
filter: a source whose loss on ``k``'s data is above ``k``'s own never counts), 0 for the others;
rows sum to 1. The relatedness matrix is ``A[l, k] = c_kl`` (source ``l``, target ``k``). Heads are
swapped only between tasks whose predictions have the target's shape and loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mtlkit.core.contract import forward_full
from mtlkit.core.module_state import normalization_buffers, restore_buffers
from mtlkit.core.tasks import Batch
from mtlkit.decentralized.rules import loss_weights
from mtlkit.errors import ConfigError
from mtlkit.relatedness.rows import directed_entries
from mtlkit.train.callbacks import Callback

if TYPE_CHECKING:
    from mtlkit.train.evaluate import EvaluationReport
    from mtlkit.train.trainer import Trainer


class CrossLossSimilarity(Callback):
    """Track the accumulated cross-losses ``r`` on every training batch before the step (head
    ``l``'s prediction scored with task ``k``'s loss against task ``k``'s targets, on the samples
    labelled for ``k``), with rate ``nu`` and initial value ``r0`` (the paper's HAR setting:
    ``nu = 0.001``, ``r0 = 1``; digits: ``nu = 0.05``). :meth:`relatedness` is ``A[l, k] = c_kl``;
    each epoch adds ``relatedness/cross_loss/<source>-><target>`` to the Trainer's row."""

    def __init__(self, nu: float = 0.05, r0: float = 1.0) -> None:
        if not 0 < nu <= 1 or not r0 > 0:
            raise ConfigError(f"CrossLossSimilarity needs 0 < nu <= 1 and r0 > 0, got nu={nu}, r0={r0}.")
        self.nu, self.r0 = nu, r0
        self.names: list[str] = []
        self.r: Tensor | None = None

    def on_train_batch_start(self, trainer: Trainer, batch: Any) -> None:
        if not isinstance(batch, Batch):
            raise ConfigError(
                "CrossLossSimilarity needs ordinary batches (every task's labels on the same inputs)."
            )
        tasks = trainer.tasks
        self.names = list(tasks.names)
        k = len(tasks)
        if self.r is None:
            self.r = torch.full((k, k), float(self.r0), dtype=torch.float64)
        buffers = normalization_buffers(trainer.model)
        try:
            with torch.no_grad():
                predictions = forward_full(trainer.model, batch.inputs).predictions
        finally:
            restore_buffers(buffers)
        for i, target_task in enumerate(tasks):
            target = batch.targets[target_task.target_key]
            mask = batch.masks.get(target_task.name) if batch.masks else None
            for j, source in enumerate(tasks.names):
                pred = predictions[source]
                if not _compatible(pred, predictions[target_task.name]):
                    self.r[i, j] = float("nan")
                    continue
                loss, count = target_task.loss_value(pred, target, mask)
                if int(count) == 0:
                    continue
                self.r[i, j] = (1 - self.nu) * self.r[i, j] + self.nu * float(loss)

    def weights(self) -> Tensor:
        """``c[k, l]``: target ``k``'s weight on source ``l`` (rows sum to 1)."""
        if self.r is None:
            raise ConfigError("CrossLossSimilarity has not measured a batch yet.")
        return loss_weights(self.r)

    def relatedness(self) -> Tensor:
        """``A[l, k] = c_kl``: row = source, column = target."""
        return self.weights().T

    def on_epoch_end(
        self, trainer: Trainer, epoch: int, row: dict[str, float], report: EvaluationReport | None
    ) -> None:
        if self.r is None:
            return
        row.update(directed_entries("relatedness/cross_loss", self.names, self.relatedness()))

    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "r": self.r}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            self.names, self.r = list(state["names"]), state["r"]


def _compatible(pred: Tensor, own: Tensor) -> bool:
    return pred.shape == own.shape and pred.dtype == own.dtype
