"""Tasks and task sets: what each task predicts, how its loss is computed, which labels are missing.

A :class:`Task` names one prediction target, its loss (a shortcut or a callable), the metrics it is
judged by and an optional fixed weight. A :class:`TaskSet` turns a model's ``{task: output}`` and the
batch's ``{task: target}`` into ``{task: scalar loss}``.

Missing labels are masked, never imputed: a sample whose target is NaN (or negative, for class
indices; or ``False`` in an explicit mask) is left out of that task's loss, which is the mean over the
labelled entries only. A task with no labelled entry in the batch gets a loss of exactly zero that is
still attached to the graph, so it contributes no gradient and no NaN, and the returned
:class:`TaskLosses` records its label count as zero so gradient methods can leave it out.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlkit.errors import (
    DTypeMismatchError,
    MissingTaskError,
    ShapeMismatchError,
    TaskError,
    unknown_name,
)

LossFn = Callable[[Tensor, Tensor], Tensor]

#: Loss shortcuts. Elementwise losses take a prediction and a target of the same shape; "ce" takes
#: logits of shape (B, C, ...) and integer class indices of shape (B, ...).
ELEMENTWISE_LOSSES: dict[str, LossFn] = {
    "mse": lambda p, t: F.mse_loss(p, t, reduction="none"),
    "l1": lambda p, t: F.l1_loss(p, t, reduction="none"),
    "huber": lambda p, t: F.huber_loss(p, t, reduction="none", delta=1.0),
    "bce": lambda p, t: F.binary_cross_entropy_with_logits(p, t, reduction="none"),
}
CLASS_INDEX_LOSSES = ("ce",)
LOSS_SHORTCUTS = (*ELEMENTWISE_LOSSES, *CLASS_INDEX_LOSSES)


@dataclass(frozen=True)
class Task:
    """One task of a multi-task problem.

    Args:
        name: unique task name; the model's output dict and the batch's target dict use it.
        loss: ``"mse"``, ``"l1"``, ``"huber"``, ``"bce"`` (on logits), ``"ce"`` (on logits, integer
            targets), or a callable ``loss(pred, target) -> Tensor``. A callable receives only the
            labelled samples and may return a scalar or per-sample values (then averaged).
        metrics: metric names (``"accuracy"``, ``"auc"``, ``"f1"``, ``"mse"``, ``"mae"``, ``"r2"``)
            or metric objects from :mod:`mtlkit.metrics`; the first one is the task's main metric.
            A callable loss receives only the samples whose target row is fully labelled.
        weight: fixed weight used by linear scalarisation (EW); 1.0 by default.
        target: key of this task's target in the batch's target dict (defaults to ``name``).
    """

    name: str
    loss: str | LossFn = "mse"
    metrics: Sequence[Any] = ()
    weight: float = 1.0
    target: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TaskError(f"A task name must be a non-empty string, got {self.name!r}.")
        if isinstance(self.loss, str):
            if self.loss not in LOSS_SHORTCUTS:
                raise unknown_name(f"loss of task {self.name!r}", self.loss, LOSS_SHORTCUTS)
        elif not callable(self.loss):
            raise TaskError(f"Task {self.name!r}: loss must be a shortcut name or a callable.")
        if not (isinstance(self.weight, (int, float)) and self.weight >= 0):
            raise TaskError(f"Task {self.name!r}: weight must be a number >= 0, got {self.weight!r}.")
        object.__setattr__(self, "metrics", tuple(self.metrics))

    @property
    def target_key(self) -> str:
        return self.target or self.name

    @property
    def loss_name(self) -> str:
        return self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", "custom")

    def labelled_mask(self, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """Boolean mask of labelled target entries (same shape as ``target``)."""
        if self.loss in CLASS_INDEX_LOSSES:
            valid = target >= 0
        elif target.is_floating_point():
            valid = ~torch.isnan(target)
        else:
            valid = torch.ones_like(target, dtype=torch.bool)
        if mask is not None:
            mask = mask.to(device=target.device, dtype=torch.bool)
            if mask.shape != target.shape:
                if mask.dim() == 1 and mask.shape[0] == target.shape[0]:
                    mask = mask.view(-1, *([1] * (target.dim() - 1))).expand_as(target)
                else:
                    raise ShapeMismatchError(
                        f"Task {self.name!r}: label mask shape {tuple(mask.shape)} fits neither the "
                        f"target shape {tuple(target.shape)} nor its batch size."
                    )
            valid = valid & mask
        return valid

    def align(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Check and align a prediction with its target; raise a clear error on mismatch."""
        if not isinstance(pred, Tensor) or not pred.is_floating_point():
            raise DTypeMismatchError(
                f"Task {self.name!r}: the model output must be a floating-point tensor, "
                f"got {getattr(pred, 'dtype', type(pred).__name__)}."
            )
        if not isinstance(target, Tensor):
            raise DTypeMismatchError(
                f"Task {self.name!r}: the target must be a tensor, got {type(target).__name__}."
            )
        if pred.dim() == 0 or target.dim() == 0 or pred.shape[0] != target.shape[0]:
            raise ShapeMismatchError(
                f"Task {self.name!r}: prediction {tuple(pred.shape)} and target "
                f"{tuple(target.shape)} must share the batch dimension."
            )
        if self.loss in CLASS_INDEX_LOSSES:
            if target.is_floating_point() or target.dtype == torch.bool:
                raise DTypeMismatchError(
                    f"Task {self.name!r}: loss 'ce' expects integer class indices as targets, got "
                    f"{target.dtype}. Use .long() targets, or loss='bce' for 0/1 labels."
                )
            if pred.dim() != target.dim() + 1 or pred.shape[2:] != target.shape[1:]:
                raise ShapeMismatchError(
                    f"Task {self.name!r}: loss 'ce' expects logits of shape (B, C, ...) for targets "
                    f"(B, ...); got prediction {tuple(pred.shape)} and target {tuple(target.shape)}."
                )
            return pred.to(torch.promote_types(pred.dtype, torch.float32)), target
        if target.is_complex():
            raise DTypeMismatchError(f"Task {self.name!r}: complex targets are not supported.")
        if pred.shape != target.shape:
            if pred.dim() == target.dim() + 1 and pred.shape[-1] == 1:
                pred = pred.squeeze(-1)
            elif target.dim() == pred.dim() + 1 and target.shape[-1] == 1:
                target = target.squeeze(-1)
            if pred.shape != target.shape:
                raise ShapeMismatchError(
                    f"Task {self.name!r}: loss {self.loss_name!r} expects a prediction of the "
                    f"target's shape {tuple(target.shape)}, got {tuple(pred.shape)}."
                )
        # Losses run in at least float32: autocast's float16/bfloat16 outputs would round the
        # targets (bfloat16 turns 1234.5 into 1232) or overflow them.
        dtype = torch.promote_types(pred.dtype, torch.float32)
        if target.is_floating_point():
            dtype = torch.promote_types(dtype, target.dtype)
        return pred.to(dtype), target.to(dtype)

    def check_target_values(self, target: Tensor, valid: Tensor, pred_shape: Sequence[int]) -> None:
        """Raise :class:`TaskError` naming the task when a labelled target is out of the loss's
        range: a ``ce`` class index >= the number of classes, a ``bce`` label outside [0, 1]."""
        if self.loss in CLASS_INDEX_LOSSES:
            classes = int(pred_shape[1])
            bad = valid & (target >= classes)
            if bool(bad.any()):
                raise TaskError(
                    f"Task {self.name!r}: class index {int(target[bad].max())} is out of range for "
                    f"{classes} classes (logits {tuple(pred_shape)}); negative indices mark missing labels."
                )
        elif self.loss == "bce":
            bad = valid & ((target < 0) | (target > 1))
            if bool(bad.any()):
                raise TaskError(
                    f"Task {self.name!r}: loss 'bce' needs labels in [0, 1] (NaN marks a missing "
                    f"label); got {target[bad][:5].tolist()}."
                )

    def loss_value(
        self, pred: Tensor, target: Tensor, mask: Tensor | None = None, check: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Masked mean loss and the number of labelled entries (a 0-dim integer tensor).

        Runs without a host synchronisation for the built-in losses: unlabelled entries get a
        harmless target and a zero weight, so no NaN reaches the forward or the backward pass.
        ``check=False`` skips the host check of the target values (done beforehand by the caller,
        e.g. the Trainer before a compiled loss computation, which a data-dependent check would
        break into pieces).
        """
        pred, target, valid = self._prepared(pred, target, mask, check)
        count = valid.sum()
        if not isinstance(self.loss, str):
            return self._custom_loss(pred, target, valid), count
        values = self._entry_losses(pred, target, valid)
        return values.sum() / count.clamp(min=1).to(values.dtype), count

    def _prepared(
        self, pred: Tensor, target: Tensor, mask: Tensor | None, check: bool = True
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The aligned prediction and target and the labelled-entry mask, with the target's values
        checked against the loss's range."""
        pred, target = self.align(pred, target)
        valid = self.labelled_mask(target, mask)
        if (
            check and target.device.type == "cpu"
        ):  # free on the host; the Trainer checks device batches on the host
            self.check_target_values(target, valid, pred.shape)
        return pred, target, valid

    def _entry_losses(self, pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        """A built-in loss per target entry, 0 where unlabelled (no NaN in either pass)."""
        if self.loss in CLASS_INDEX_LOSSES:
            safe_target = torch.where(valid, target, torch.zeros_like(target))
            values = F.cross_entropy(pred, safe_target, reduction="none")
        else:
            assert isinstance(self.loss, str)
            safe_target = torch.where(valid, target, pred.detach())
            values = ELEMENTWISE_LOSSES[self.loss](pred, safe_target)
        return torch.where(valid, values, torch.zeros_like(values))

    def sample_losses(
        self, pred: Tensor, target: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Each sample's summed loss over its labelled entries and their number, both (B,): the
        task's loss is ``sums.sum() / counts.sum()``. Influence functions need the per-sample
        terms; a callable loss must then return per-sample values (one per labelled row)."""
        pred, target, valid = self._prepared(pred, target, mask)
        rows = valid.reshape(valid.shape[0], -1)
        if isinstance(self.loss, str):
            values = self._entry_losses(pred, target, valid)
            return values.reshape(values.shape[0], -1).sum(1), rows.sum(1)
        labelled = rows.all(dim=1)
        fn = self.loss
        value = fn(pred[labelled], target[labelled])
        if not isinstance(value, Tensor) or value.shape != (int(labelled.sum()),):
            raise TaskError(
                f"Task {self.name!r}: per-sample losses need a loss callable that returns one value per "
                f"labelled sample, shape ({int(labelled.sum())},); got "
                f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}."
            )
        sums = value.new_zeros(pred.shape[0]).index_put((labelled.nonzero().squeeze(1),), value)
        return sums, labelled.long()

    def _custom_loss(self, pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        # A user's callable sees only fully labelled samples (every entry of the row labelled),
        # so it never receives a NaN target.
        rows = valid.reshape(valid.shape[0], -1).all(dim=1) if valid.dim() > 1 else valid
        fn = self.loss
        assert callable(fn)
        if bool(rows.all()):
            value = fn(pred, target)
        elif not bool(rows.any()):
            return pred.sum() * 0.0
        else:
            value = fn(pred[rows], target[rows])
        if not isinstance(value, Tensor):
            raise TaskError(f"Task {self.name!r}: the loss callable must return a tensor.")
        return value.mean() if value.dim() > 0 else value


class TaskLosses(Mapping[str, Tensor]):
    """``{task: scalar loss}`` (read-only) and the number of labelled entries per task.

    ``labelled`` is a 1-D tensor in task order; a zero means the task had no label in the batch,
    so gradient methods leave it out of the solve and give it weight zero. :meth:`map` derives new
    losses (scaled, cast) that keep the counts.
    """

    def __init__(self, losses: Mapping[str, Tensor], labelled: Tensor | None = None) -> None:
        self._losses = dict(losses)
        if labelled is not None and labelled.shape != (len(self._losses),):
            raise TaskError(
                f"labelled must have one count per task ({len(self._losses)}), got {tuple(labelled.shape)}."
            )
        self._labelled = labelled

    @property
    def labelled(self) -> Tensor | None:
        return self._labelled

    def __getitem__(self, name: str) -> Tensor:
        return self._losses[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._losses)

    def __len__(self) -> int:
        return len(self._losses)

    def map(self, fn: Callable[[Tensor], Tensor]) -> TaskLosses:
        """``{task: fn(loss)}`` with the same label counts."""
        return TaskLosses({k: fn(v) for k, v in self._losses.items()}, self._labelled)

    def __repr__(self) -> str:
        return f"TaskLosses({self._losses!r}, labelled={self._labelled!r})"


class TaskSet(Sequence[Task]):
    """An ordered collection of uniquely named tasks."""

    def __init__(self, tasks: Sequence[Task] | Mapping[str, Any]) -> None:
        if isinstance(tasks, Mapping):
            tasks = [t if isinstance(t, Task) else Task(name, **t) for name, t in tasks.items()]
        tasks = list(tasks)
        if not tasks:
            raise TaskError("A TaskSet needs at least one task.")
        for t in tasks:
            if not isinstance(t, Task):
                raise TaskError(f"TaskSet items must be mtlkit.Task objects, got {type(t).__name__}.")
        names = [t.name for t in tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise TaskError(f"Duplicate task names: {', '.join(map(repr, dupes))}. Names must be unique.")
        self._tasks = tasks
        self._index = {t.name: i for i, t in enumerate(tasks)}

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks)

    def __getitem__(self, key: int | str) -> Task:  # type: ignore[override]
        if isinstance(key, str):
            if key not in self._index:
                raise unknown_name("task", key, self._index)
            return self._tasks[self._index[key]]
        return self._tasks[key]

    def __repr__(self) -> str:
        return f"TaskSet({[t.name for t in self._tasks]})"

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._tasks]

    def index(self, name: str) -> int:  # type: ignore[override]
        if name not in self._index:
            raise unknown_name("task", name, self._index)
        return self._index[name]

    @property
    def weights(self) -> list[float]:
        return [t.weight for t in self._tasks]

    def losses(
        self,
        outputs: Mapping[str, Tensor],
        targets: Mapping[str, Tensor],
        masks: Mapping[str, Tensor] | None = None,
        check: bool = True,
    ) -> TaskLosses:
        """Per-task scalar losses ``{task: loss}`` (see the module docstring for missing labels).

        Args:
            outputs: the model's ``{task: prediction}``.
            targets: ``{target_key: tensor}``; NaN (or a negative class index) marks a missing label.
            masks: optional ``{task: bool tensor}``, ``True`` where a label is present.
            check: check host targets against the losses' ranges here (``False``: the caller ran
                :meth:`check_targets` already).
        """
        fns = {t.name: functools.partial(t.loss_value, check=check) for t in self._tasks}
        return self._losses_with(fns, outputs, targets, masks)

    def compile_losses(self, **options: Any) -> Callable[..., TaskLosses]:
        """:meth:`losses` with each task's loss under ``torch.compile(**options)`` on its own (one
        graph per task: a graph fusing every task's loss would make each task's backward reach
        every head) and without the host check of the targets inside (run :meth:`check_targets`
        first; a data-dependent check would break the graphs)."""
        fns = {
            t.name: torch.compile(functools.partial(t.loss_value, check=False), **options)
            for t in self._tasks
        }

        def losses(
            outputs: Mapping[str, Tensor],
            targets: Mapping[str, Tensor],
            masks: Mapping[str, Tensor] | None = None,
        ) -> TaskLosses:
            return self._losses_with(fns, outputs, targets, masks)

        return losses

    def _losses_with(
        self,
        fns: Mapping[str, Callable[..., tuple[Tensor, Tensor]]],
        outputs: Mapping[str, Tensor],
        targets: Mapping[str, Tensor],
        masks: Mapping[str, Tensor] | None,
    ) -> TaskLosses:
        missing_out = [t.name for t in self._tasks if t.name not in outputs]
        if missing_out:
            raise MissingTaskError(
                f"The model output has no entry for task(s) {missing_out}; it has {sorted(outputs)}."
            )
        missing_t = [t.target_key for t in self._tasks if t.target_key not in targets]
        if missing_t:
            raise MissingTaskError(f"The batch has no target for {missing_t}; it has {sorted(targets)}.")
        values: dict[str, Tensor] = {}
        counts = []
        for t in self._tasks:
            mask = masks.get(t.name) if masks else None
            values[t.name], count = fns[t.name](outputs[t.name], targets[t.target_key], mask)
            counts.append(count)
        return TaskLosses(values, torch.stack(counts))

    def check_targets(
        self,
        targets: Mapping[str, Tensor],
        outputs: Mapping[str, Tensor],
        masks: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Check the host copies of a batch's targets against the loss ranges (the Trainer calls
        this for batches it moves to an accelerator, where a check would cost a synchronisation)."""
        for t in self._tasks:
            target = targets.get(t.target_key)
            pred = outputs.get(t.name)
            if target is None or pred is None or target.device.type != "cpu":
                continue
            mask = masks.get(t.name) if masks else None
            t.check_target_values(target, t.labelled_mask(target, mask), tuple(pred.shape))

    def labelled_masks(
        self, targets: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """``{task: bool mask}`` of labelled entries, for metric computation."""
        return {
            t.name: t.labelled_mask(targets[t.target_key], masks.get(t.name) if masks else None)
            for t in self._tasks
        }


@dataclass
class Batch:
    """A multi-task batch: inputs, ``{task: target}`` and optional ``{task: label mask}``."""

    inputs: Any
    targets: dict[str, Tensor]
    masks: dict[str, Tensor] | None = field(default=None)


@dataclass
class TaskBatches:
    """One step's data when tasks do not share inputs (multi-input training): ``{task: Batch}``,
    each task's own inputs and targets. Tasks absent from ``batches`` are not trained this step
    (alternating training loads only the sampled task's batch)."""

    batches: dict[str, Batch]

    def __post_init__(self) -> None:
        if not self.batches:
            raise TaskError("TaskBatches needs at least one task's batch.")
        bad = [t for t, b in self.batches.items() if not isinstance(b, Batch)]
        if bad:
            raise TaskError(f"TaskBatches holds mtlkit.Batch objects; task(s) {bad} hold something else.")


def unpack_batch(batch: Any) -> Batch | TaskBatches:
    """Accept ``Batch``, ``(x, targets)``, ``(x, targets, masks)``, a dict with those keys, or
    ``TaskBatches`` (multi-input training, passed through)."""
    if isinstance(batch, (Batch, TaskBatches)):
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
