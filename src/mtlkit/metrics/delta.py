"""Δm%: the average relative gain of a multi-task model over single-task baselines.

Maninis, Radosavovic, Kokkinos, "Attentive Single-Tasking of Multiple Tasks", CVPR 2019:

    Δm = 1/T * sum_t (-1)^{l_t} (M_mtl,t - M_stl,t) / M_stl,t * 100,   l_t = 1 if lower is better,

so a POSITIVE Δm% means the multi-task model is better than the single-task models. (The
Nash-MTL/FAMO tables flip the sign: there lower is better.) A task with several metrics contributes
the mean of its metrics' relative changes, as in LibMTL. Changes are divided by ``|M_stl|`` (the
same as Maninis et al. for the usual positive metrics; it keeps the sign meaningful for a negative
baseline such as R2 < 0). An undefined change (NaN metric, zero baseline) makes Δm NaN with a
warning instead of stopping a run. A task whose every metric is NaN in both the result and the
reference has no labelled sample in the split (a group too small for a test example): it is left
out of Δm, as there is nothing to compare. The reference must come from separately trained
single-task models, never from an earlier epoch of the same run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

from mtlkit.errors import TaskError

Scores = Mapping[str, Mapping[str, float]]


def check_reference(reference: Scores, metrics: Mapping[str, Mapping[str, object]]) -> None:
    """Raise :class:`TaskError` unless ``reference`` has every task and metric of ``metrics``."""
    for task, names in metrics.items():
        if task not in reference:
            raise TaskError(f"The Δm reference has no result for task {task!r}; it has {sorted(reference)}.")
        missing = sorted(set(names) - set(reference[task]))
        if missing:
            raise TaskError(f"The Δm reference has no {missing} for task {task!r}.")


def _relative_change(task: str, name: str, value: float, base: float, higher_is_better: bool) -> float:
    if base == 0 or math.isnan(base) or math.isnan(value):
        # e.g. an AUC on a split where the task has only one class: report, don't crash a run
        warnings.warn(
            f"Δm is undefined for task {task!r}, metric {name!r} (reference {base}, value {value}); "
            "it is reported as NaN.",
            RuntimeWarning,
            stacklevel=3,
        )
        return math.nan
    sign = 1.0 if higher_is_better else -1.0
    return sign * (value - base) / abs(base) * 100.0


def per_task_delta(
    metrics: Scores, reference: Scores, higher_is_better: Mapping[str, Mapping[str, bool]]
) -> dict[str, float]:
    """Signed relative change (%) per task, averaged over the task's metrics."""
    check_reference(reference, metrics)
    out: dict[str, float] = {}
    for task, task_metrics in metrics.items():
        if task_metrics and all(
            math.isnan(value) and math.isnan(reference[task][name]) for name, value in task_metrics.items()
        ):
            continue  # no labelled sample of this task in the split, here or in the reference
        changes = [
            _relative_change(task, name, value, reference[task][name], higher_is_better[task][name])
            for name, value in task_metrics.items()
        ]
        if changes:
            out[task] = sum(changes) / len(changes)
    return out


def delta_m(metrics: Scores, reference: Scores, higher_is_better: Mapping[str, Mapping[str, bool]]) -> float:
    """Δm% (positive = better than the single-task reference); see the module docstring."""
    per_task = per_task_delta(metrics, reference, higher_is_better)
    if not per_task:
        raise TaskError("Δm needs at least one task with metrics.")
    return sum(per_task.values()) / len(per_task)
