"""A task metric's description: name, function and direction (the task layer's vocabulary, so
that datasets can describe their tasks' metrics without depending on the metrics layer)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Metric:
    """A task metric.

    Args:
        name: short name used in reports and logs.
        fn: ``fn(y_true, y_score) -> float`` on numpy arrays of labelled samples; ``y_score`` is a
            probability (binary), a (N, C) probability matrix (multi-class) or a raw value.
        higher_is_better: the metric's direction (used by Δm% and early stopping).
    """

    name: str
    fn: Callable[[np.ndarray, np.ndarray], float]
    higher_is_better: bool

    def __call__(self, y_true: np.ndarray, y_score: np.ndarray) -> float:
        return float(self.fn(y_true, y_score))
