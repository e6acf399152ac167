"""Per-task metrics computed on labelled samples only, with scikit-learn doing the arithmetic."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mtlkit.core.metric import Metric
from mtlkit.core.registry import Registry
from mtlkit.core.tasks import CLASS_INDEX_LOSSES, Task
from mtlkit.errors import TaskError


def _skm():  # scikit-learn costs ~2 s to import; only metric computations need it
    from sklearn import metrics

    return metrics


def _is_multiclass(y_score: np.ndarray) -> bool:
    return y_score.ndim == 2 and y_score.shape[1] > 1


def _labels(y_score: np.ndarray) -> np.ndarray:
    return y_score.argmax(1) if _is_multiclass(y_score) else (y_score >= 0.5).astype(np.int64)


def _accuracy(y, s):
    return _skm().accuracy_score(y.astype(np.int64), _labels(s))


def _auc(y, s):
    if _is_multiclass(s):
        return _skm().roc_auc_score(y.astype(np.int64), s, multi_class="ovr", labels=np.arange(s.shape[1]))
    if len(np.unique(y)) < 2:
        return float("nan")  # AUC is undefined with one class present
    return _skm().roc_auc_score(y, s)


def _f1(y, s):
    average = "macro" if _is_multiclass(s) else "binary"
    return _skm().f1_score(y.astype(np.int64), _labels(s), average=average, zero_division=0.0)


METRICS: Registry[Metric] = Registry("metric")
_BUILTIN = [
    Metric("accuracy", _accuracy, True),
    Metric("auc", _auc, True),
    Metric("f1", _f1, True),
    Metric("mse", lambda y, s: _skm().mean_squared_error(y, s), False),
    Metric("mae", lambda y, s: _skm().mean_absolute_error(y, s), False),
    Metric("r2", lambda y, s: _skm().r2_score(y, s), True),
]
for _m in _BUILTIN:
    METRICS.register(_m.name)(lambda _m=_m: _m)


def get_metric(spec: str | Metric) -> Metric:
    """A :class:`Metric` from a name or a metric object."""
    return spec if isinstance(spec, Metric) else METRICS.create(spec)


def task_metrics(task: Task) -> list[Metric]:
    return [get_metric(m) for m in task.metrics]


def predictions_for(task: Task, output: Tensor) -> Tensor:
    """Scores the metrics expect: probabilities for "bce"/"ce" logits, raw values otherwise."""
    if task.loss == "bce":
        out = torch.sigmoid(output.float())
        return out.squeeze(-1) if out.dim() > 1 and out.shape[-1] == 1 else out
    if task.loss in CLASS_INDEX_LOSSES:
        return torch.softmax(output.float(), dim=1)
    out = output.float()
    return out.squeeze(-1) if out.dim() > 1 and out.shape[-1] == 1 else out


def compute_metrics(
    task: Task, scores: np.ndarray, targets: np.ndarray, labelled: np.ndarray
) -> dict[str, float]:
    """``{metric: value}`` for one task over its labelled samples (NaN when none is labelled)."""
    metrics = task_metrics(task)
    if labelled.ndim > 1:  # elementwise labels: a sample counts if all its entries are labelled
        labelled = np.asarray(labelled.reshape(labelled.shape[0], -1).all(1))
    y, s = targets[labelled], scores[labelled]
    if y.shape[0] == 0:
        return {m.name: float("nan") for m in metrics}
    try:
        return {m.name: m(y, s) for m in metrics}
    except ValueError as exc:
        raise TaskError(f"Task {task.name!r}: cannot compute its metrics: {exc}") from exc


def directions(tasks: Sequence[Task]) -> dict[str, dict[str, bool]]:
    """``{task: {metric: higher_is_better}}``."""
    return {t.name: {m.name: m.higher_is_better for m in task_metrics(t)} for t in tasks}
