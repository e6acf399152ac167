"""A trade-off front: the evaluated points of one front-learning run, and their quality."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from mtlkit.core.contract import unwrap
from mtlkit.core.preferences import check_preference
from mtlkit.core.tasks import TaskSet
from mtlkit.errors import ConfigError
from mtlkit.metrics.pareto import hypervolume, igd_plus, non_dominated, spacing
from mtlkit.models.preference_input import TakesPreference
from mtlkit.train.device import resolve_device
from mtlkit.train.evaluate import evaluate


@dataclass
class FrontPoint:
    """One point of a front: the preference it was asked for, and its test losses and metrics."""

    preference: list[float]
    losses: dict[str, float]
    metrics: dict[str, dict[str, float]]


@dataclass
class Front:
    """The points of a front in task order, with helpers for the usual front metrics."""

    tasks: list[str]
    points: list[FrontPoint] = field(default_factory=list)

    def losses(self) -> NDArray[np.float64]:
        """``(n, K)`` test losses (lower is better)."""
        return np.array([[p.losses[t] for t in self.tasks] for p in self.points], dtype=np.float64)

    def metric(self, name: str) -> NDArray[np.float64]:
        """``(n, K)`` values of the metric ``name`` of every task."""
        try:
            return np.array([[p.metrics[t][name] for t in self.tasks] for p in self.points], dtype=np.float64)
        except KeyError as missing:
            raise ConfigError(f"Front.metric: no metric {name!r} for every task ({missing}).") from None

    def hypervolume(self, reference: Sequence[float]) -> float:
        """Hypervolume of the test losses against ``reference`` (COSMOS and PHN use (2, 2) for the
        two cross-entropies of the MultiMNIST-type sets)."""
        return hypervolume(self.losses(), reference)

    def summary(
        self, reference: Sequence[float], ideal: Sequence[Sequence[float]] | None = None
    ) -> dict[str, float]:
        """Hypervolume, the number of non-dominated points, spacing and (given a reference front,
        e.g. the single-task point) IGD+ of the losses."""
        losses = self.losses()
        out = {
            "hypervolume": hypervolume(losses, reference),
            "non_dominated": float(non_dominated(losses).sum()),
            "points": float(len(losses)),
        }
        if len(losses) > 1:
            out["spacing"] = spacing(losses)
        if ideal is not None:
            out["igd_plus"] = igd_plus(losses, ideal)
        return out


def evaluate_front(
    models: nn.Module | Sequence[nn.Module],
    tasks: TaskSet,
    loader: Iterable[Any],
    preferences: Tensor | Sequence[Sequence[float]],
    device: str | torch.device = "cpu",
) -> Front:
    """Evaluate a front on ``loader``: one preference-conditioned model at every preference (set with
    ``set_preference``), or one model per preference (a list as long as ``preferences``)."""
    rays = [check_preference(list(map(float, r)), tasks=len(tasks)) for r in preferences]
    if not rays:
        raise ConfigError("evaluate_front: need at least one preference.")
    if isinstance(models, nn.Module):
        model = unwrap(models)
        if not isinstance(model, TakesPreference):
            raise ConfigError(
                f"evaluate_front: {type(model).__name__} does not take a preference; pass one model per preference."
            )
        pairs = [(models, r) for r in rays]
    else:
        if len(models) != len(rays):
            raise ConfigError(f"evaluate_front: {len(models)} models for {len(rays)} preferences.")
        pairs = list(zip(models, rays, strict=True))
    dev = resolve_device(device)
    front = Front(list(tasks.names))
    for model, r in pairs:
        inner = unwrap(model)
        if isinstance(inner, TakesPreference):
            inner.set_preference(r)
        report = evaluate(model.to(dev), tasks, loader, dev)
        front.points.append(FrontPoint([float(v) for v in r], dict(report.losses), report.metrics))
    return front
