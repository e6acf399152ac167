"""Choosing a method's scaling on validation data (a grid or a golden-section search), never on
test data: the caller's ``evaluate`` sees only the merged model."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mtlkit.errors import ConfigError
from mtlkit.merging.base import MERGERS
from mtlkit.merging.merge import MergeResult, merge

#: the Task Arithmetic paper's grid: 0 to 1 in steps of 0.05
DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(21))
GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass
class ScalingSearch:
    """The chosen scaling, its merge, and every value tried with its validation score."""

    best: float
    result: MergeResult
    scores: dict[float, float] = field(default_factory=dict)
    on_boundary: bool = False


def select_scaling(
    pretrained: Any,
    experts: Mapping[str, Any],
    method: str,
    evaluate: Callable[[MergeResult], float],
    *,
    values: Sequence[float] | None = None,
    search: str = "grid",
    bounds: tuple[float, float] = (0.0, 1.0),
    iterations: int = 12,
    **options: Any,
) -> ScalingSearch:
    """Merge with each candidate ``scaling`` and keep the one whose merged model ``evaluate``
    scores highest (higher is better; pass a validation metric, never a test one).

    ``search="grid"`` tries ``values`` (default 0, 0.05, ..., 1, the Task Arithmetic paper's grid);
    ``search="golden"`` runs ``iterations`` golden-section steps on ``bounds`` (assumes the score
    is unimodal in the scaling). A best value on the edge of the searched range is reported
    (``on_boundary``) with a warning: the optimum may lie outside it.
    """
    factory = MERGERS.get(method)
    if "scaling" not in inspect.signature(factory).parameters:
        raise ConfigError(f"{method} has no scaling to select.")
    if "scaling" in options:
        raise ConfigError("select_scaling chooses scaling itself; do not pass it.")
    scores: dict[float, float] = {}
    kept: dict[float, MergeResult] = {}  # only the best merge so far: one model in memory, not one per value

    def score(value: float) -> float:
        if value not in scores:
            result = merge(pretrained, experts, method, scaling=value, **options)
            s = float(evaluate(result))
            if math.isnan(s):
                raise ConfigError(f"evaluate returned NaN for scaling {value}.")
            scores[value] = s
            if not kept or (s, -value) > max((scores[v], -v) for v in kept):
                kept.clear()
                kept[value] = result
        return scores[value]

    if search == "grid":
        grid = sorted(set(float(v) for v in (values if values is not None else DEFAULT_GRID)))
        if not grid:
            raise ConfigError("select_scaling needs at least one value.")
        for v in grid:
            score(v)
        low, high = grid[0], grid[-1]
    elif search == "golden":
        low, high = float(bounds[0]), float(bounds[1])
        if not low < high:
            raise ConfigError(f"bounds must be (low, high) with low < high, got {bounds}.")
        a, b = low, high
        c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
        for _ in range(int(iterations)):
            if score(c) >= score(d):
                b, d = d, c
                c = b - GOLDEN * (b - a)
            else:
                a, c = c, d
                d = a + GOLDEN * (b - a)
        score(low)
        score(high)
    else:
        raise ConfigError(f"search must be 'grid' or 'golden', got {search!r}.")
    best = max(scores, key=lambda v: (scores[v], -v))
    edge = best in (low, high) and len(scores) > 1
    if edge:
        warnings.warn(
            f"select_scaling: the best scaling {best} is on the edge of the searched range [{low}, {high}]; "
            "the optimum may lie outside it.",
            stacklevel=2,
        )
    return ScalingSearch(best, kept[best], dict(sorted(scores.items())), edge)
