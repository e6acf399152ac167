"""Front plots (matplotlib): each approach's front over its seeds, with single-point methods and
the single-task point beside them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from mtlkit.core.figures import pyplot, save_figure
from mtlkit.errors import ConfigError
from mtlkit.metrics.pareto import non_dominated


def plot_fronts(
    fronts: Mapping[str, Sequence[NDArray[np.float64]]],
    out: str | Path,
    *,
    labels: tuple[str, str],
    title: str,
    points: Mapping[str, tuple[float, float]] | None = None,
    single_task: tuple[float, float] | None = None,
    maximize: bool = False,
) -> Path:
    """One colour per approach: every seed's front as a line through its points in preference
    order (faint after the first seed); ``points`` (single-point methods) as grey dots with the
    non-dominated ones named; ``single_task`` as a star. Two objectives only."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6))
    cmap = plt.get_cmap("tab10")
    for i, (name, seeds) in enumerate(fronts.items()):
        for j, front in enumerate(seeds):
            front = np.asarray(front, dtype=np.float64)
            if front.ndim != 2 or front.shape[1] != 2:
                raise ConfigError(f"plot_fronts: {name}'s front must be (n, 2), got {front.shape}.")
            ax.plot(
                front[:, 0],
                front[:, 1],
                "-o",
                ms=3 if len(front) > 8 else 6,
                lw=1.0,
                color=cmap(i % 10),
                alpha=1.0 if j == 0 else 0.35,
                label=name if j == 0 else None,
            )
    if points:
        xy = np.array(list(points.values()), dtype=np.float64)
        ax.scatter(xy[:, 0], xy[:, 1], s=12, color="0.55", label="single-point methods", zorder=1)
        best = non_dominated(-xy if maximize else xy)
        for name, (x, y), keep in zip(points, xy, best, strict=True):
            if keep:
                ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points", color="0.35")
    if single_task is not None:
        ax.plot(*single_task, "k*", ms=13, label="single-task")
    ax.set(xlabel=labels[0], ylabel=labels[1], title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, out)
