"""Task metrics with their direction, and the Δm% multi-task summary."""

from mtlkit.metrics.delta import check_reference, delta_m, per_task_delta
from mtlkit.metrics.task_metrics import METRICS, Metric, compute_metrics, get_metric, predictions_for

__all__ = [
    "METRICS",
    "Metric",
    "check_reference",
    "compute_metrics",
    "delta_m",
    "get_metric",
    "per_task_delta",
    "predictions_for",
]
