"""Evaluation reports: per-task metrics, mean losses and Δm% against single-task baselines."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mtlkit.core.contract import forward_full
from mtlkit.core.tasks import TaskSet
from mtlkit.errors import EmptyDataError, TaskError
from mtlkit.metrics import delta_m, per_task_delta
from mtlkit.metrics.task_metrics import compute_metrics, directions, predictions_for
from mtlkit.train.batches import move_to, unpack_batch
from mtlkit.train.device import Precision
from mtlkit.train.multi_input import task_parts


@dataclass
class EvaluationReport:
    """Result of :meth:`mtlkit.train.Trainer.evaluate`.

    Attributes:
        metrics: ``{task: {metric: value}}`` over labelled samples.
        directions: ``{task: {metric: higher_is_better}}``.
        losses: ``{task: mean loss over labelled samples}``.
        labelled: ``{task: number of labelled samples}``.
        delta_m: Δm% against ``reference`` (positive = better; Maninis et al., CVPR 2019), if given.
        per_task_delta: the per-task relative changes (%) that Δm averages.
    """

    metrics: dict[str, dict[str, float]]
    directions: dict[str, dict[str, bool]]
    losses: dict[str, float] = field(default_factory=dict)
    labelled: dict[str, int] = field(default_factory=dict)
    delta_m: float | None = None
    per_task_delta: dict[str, float] | None = None

    def with_reference(
        self, reference: EvaluationReport | Mapping[str, Mapping[str, float]]
    ) -> EvaluationReport:
        """This report with Δm% computed against ``reference`` (a report or ``{task: {metric: v}}``)."""
        ref = reference.metrics if isinstance(reference, EvaluationReport) else reference
        self.per_task_delta = per_task_delta(self.metrics, ref, self.directions)
        self.delta_m = delta_m(self.metrics, ref, self.directions)
        return self

    def flat(self, prefix: str = "") -> dict[str, float]:
        """``{"task/metric": value, "task/loss": value, "delta_m": value}`` for logs."""
        out = {f"{prefix}{t}/{m}": v for t, ms in self.metrics.items() for m, v in ms.items()}
        out.update({f"{prefix}{t}/loss": v for t, v in self.losses.items()})
        if self.delta_m is not None:
            out[f"{prefix}delta_m"] = self.delta_m
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "directions": self.directions,
            "losses": self.losses,
            "labelled": self.labelled,
            "delta_m": self.delta_m,
            "per_task_delta": self.per_task_delta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationReport:
        try:
            return cls(
                metrics={t: dict(m) for t, m in data["metrics"].items()},
                directions={t: dict(m) for t, m in data["directions"].items()},
                losses=dict(data.get("losses", {})),
                labelled=dict(data.get("labelled", {})),
                delta_m=data.get("delta_m"),
                per_task_delta=data.get("per_task_delta"),
            )
        except (KeyError, AttributeError, TypeError) as exc:
            raise TaskError(f"Not an mtlkit evaluation report: missing or malformed {exc}.") from exc

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> EvaluationReport:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def merge(cls, reports: Iterable[EvaluationReport]) -> EvaluationReport:
        """One report from several (e.g. the single-task baselines, one task each)."""
        merged = cls(metrics={}, directions={})
        for r in reports:
            overlap = set(merged.metrics) & set(r.metrics)
            if overlap:
                raise TaskError(f"Cannot merge reports that both contain task(s) {sorted(overlap)}.")
            merged.metrics.update(r.metrics)
            merged.directions.update(r.directions)
            merged.losses.update(r.losses)
            merged.labelled.update(r.labelled)
        return merged

    def __str__(self) -> str:
        lines = []
        for t, ms in self.metrics.items():
            vals = ", ".join(f"{m}={v:.4f}" for m, v in ms.items())
            loss = self.losses.get(t, math.nan)
            delta = (
                f", Δ={self.per_task_delta[t]:+.2f}%"
                if self.per_task_delta and t in self.per_task_delta
                else ""
            )
            lines.append(f"{t}: {vals}, loss={loss:.4f}{delta}")
        if self.delta_m is not None:
            lines.append(f"Δm% = {self.delta_m:+.3f} (positive = better than single-task)")
        return "\n".join(lines)


@dataclass
class Predictions:
    """Scores, targets and label masks per task over a loader, with mean losses and label counts."""

    scores: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    losses: dict[str, float]
    labelled: dict[str, int]


@torch.no_grad()
def predict(
    model: nn.Module,
    tasks: TaskSet,
    loader: Iterable[Any],
    device: torch.device,
    precision: Precision | None = None,
) -> Predictions:
    """Run ``model`` in eval mode over ``loader``; an empty loader raises
    :class:`~mtlkit.errors.EmptyDataError` (metrics of no sample would be NaN)."""
    model.eval()
    names = tasks.names
    scores: dict[str, list[np.ndarray]] = {t: [] for t in names}
    targets: dict[str, list[np.ndarray]] = {t: [] for t in names}
    masks: dict[str, list[np.ndarray]] = {t: [] for t in names}
    loss_sum = dict.fromkeys(names, 0.0)
    count = dict.fromkeys(names, 0)
    batches = 0
    for raw in loader:
        batches += 1
        for cpu, part in task_parts(unpack_batch(raw), tasks):  # multi-input: one part per task
            batch = move_to(cpu, device)
            with precision.autocast() if precision is not None else nullcontext():
                outputs = forward_full(model, batch.inputs).predictions
                if device.type != "cpu":
                    part.check_targets(cpu.targets, outputs, cpu.masks)
                losses = part.losses(outputs, batch.targets, batch.masks)
            labelled = part.labelled_masks(batch.targets, batch.masks)
            counts = losses.labelled.tolist() if losses.labelled is not None else [0] * len(part)
            for i, task in enumerate(part):
                name = task.name
                scores[name].append(predictions_for(task, outputs[name]).cpu().numpy())
                targets[name].append(batch.targets[task.target_key].float().cpu().numpy())
                masks[name].append(labelled[name].cpu().numpy())
                loss_sum[name] += float(losses[name]) * counts[i]
                count[name] += counts[i]
    if batches == 0:
        raise EmptyDataError("The evaluation loader yielded no batch; metrics of no sample are undefined.")
    return Predictions(  # a task with no batch (multi-input) has no sample: NaN metrics
        {t: np.concatenate(v) if v else np.zeros(0, np.float32) for t, v in scores.items()},
        {t: np.concatenate(v) if v else np.zeros(0, np.float32) for t, v in targets.items()},
        {t: np.concatenate(v) if v else np.zeros(0, bool) for t, v in masks.items()},
        {t: (loss_sum[t] / count[t]) if count[t] else math.nan for t in names},
        count,
    )


def evaluate(
    model: nn.Module,
    tasks: TaskSet,
    loader: Iterable[Any],
    device: torch.device,
    precision: Precision | None = None,
    reference: EvaluationReport | Mapping[str, Mapping[str, float]] | str | Path | None = None,
) -> EvaluationReport:
    """Per-task metrics and mean losses of ``model`` over ``loader``; Δm% against ``reference``."""
    pred = predict(model, tasks, loader, device, precision)
    metrics = {
        t.name: compute_metrics(t, pred.scores[t.name], pred.targets[t.name], pred.masks[t.name])
        for t in tasks
    }
    report = EvaluationReport(metrics, directions(tasks), pred.losses, pred.labelled)
    if isinstance(reference, (str, Path)):
        reference = EvaluationReport.load(reference)
    if reference is not None:
        report.with_reference(reference)
    return report
