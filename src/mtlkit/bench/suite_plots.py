"""Figures of a benchmark suite (matplotlib, from the stored results): task weights and gradient
cosines over training, the two-task trade-off (Pareto) plot, and time-to-quality curves."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mtlkit.bench.suite_config import SuiteConfig
from mtlkit.bench.suite_report import DatasetTable, build_tables
from mtlkit.core.figures import pyplot, save_figure


def _runs(results: Mapping[str, dict[str, Any]], table: DatasetTable, method: str) -> list[dict[str, Any]]:
    prefix = f"{table.dataset}/{table.architecture}/{method}/"
    return sorted(
        (r for r in results.values() if "error" not in r and r["key"].startswith(prefix)),
        key=lambda r: r["seed"],
    )


def _grid(plt: Any, count: int, title: str) -> tuple[Any, list[Any]]:
    cols = min(6, max(1, count))
    rows = max(1, math.ceil(count / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.0 * rows + 0.6), squeeze=False, sharex=False)
    fig.suptitle(title, fontsize=10)
    flat = list(axes.ravel())
    for ax in flat[count:]:
        ax.axis("off")
    return fig, flat[:count]


def plot_traces(
    results: Mapping[str, dict[str, Any]], table: DatasetTable, prefix: str, out: Path, title: str
) -> Path | None:
    """One panel per method that logs ``prefix`` values (``weight/`` or ``cosine/``): the first
    seed's trace over training steps."""
    plt = pyplot()
    panels = []
    for row in table.rows:
        runs = _runs(results, table, row.method)
        trace = runs[0].get("trace", {}) if runs else {}
        keys = [k for k in trace if k.startswith(prefix)]
        if keys and any(not math.isnan(v) for k in keys for v in trace[k]):
            panels.append((row.method, trace, keys))
    if not panels:
        return None
    fig, axes = _grid(plt, len(panels), title)
    for ax, (method, trace, keys) in zip(axes, panels, strict=True):
        for k in keys[:12]:
            ax.plot(trace["step"], trace[k], lw=1, label=k.split("/", 1)[1])
        if prefix == "cosine/":
            ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_title(method, fontsize=8)
        ax.tick_params(labelsize=6)
    if len(panels[0][2]) <= 4:
        axes[0].legend(fontsize=6)
    return save_figure(fig, out)


def plot_pareto(results: Mapping[str, dict[str, Any]], table: DatasetTable, out: Path) -> Path | None:
    """Two-task tables: each method's mean test metrics (task 1 against task 2) with its seeds as
    faint dots, the single-task point, and the methods' non-dominated set joined and labelled (the
    axes frame the means; outlying seeds fall outside)."""
    if len(table.columns) != 2:
        return None
    plt = pyplot()
    (t1, m1, h1), (t2, m2, h2) = table.columns
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab20")
    points = {}
    for i, r in enumerate(table.rows):
        a, b = r.metrics[f"{t1}/{m1}"], r.metrics[f"{t2}/{m2}"]
        if math.isnan(a.mean) or math.isnan(b.mean):
            continue
        points[r.method] = (a.mean, b.mean)
        colour = cmap(i % 20)
        seeds = [(run["test"][t1][m1], run["test"][t2][m2]) for run in _runs(results, table, r.method)]
        ax.scatter(*zip(*seeds, strict=True), s=8, color=colour, alpha=0.3, lw=0)
        ax.plot(a.mean, b.mean, "o" if i < 20 else "s", ms=5, color=colour, label=r.method)
    stl = (table.baseline[f"{t1}/{m1}"].mean, table.baseline[f"{t2}/{m2}"].mean)
    ax.plot(*stl, "k*", ms=12, label="single-task")
    front = _front(points, h1, h2)
    if front:
        ax.plot(*zip(*sorted(points[m] for m in front), strict=True), "r--", lw=0.8)
        for m in front:
            ax.annotate(m, points[m], fontsize=7, xytext=(3, 3), textcoords="offset points", color="r")
    xs = [p[0] for p in points.values()] + [stl[0]]
    ys = [p[1] for p in points.values()] + [stl[1]]
    pad_x, pad_y = 0.08 * (max(xs) - min(xs) or 1e-3), 0.08 * (max(ys) - min(ys) or 1e-3)
    ax.set_xlim(min(xs) - pad_x, max(xs) + pad_x)
    ax.set_ylim(min(ys) - pad_y, max(ys) + pad_y)
    ax.set(
        xlabel=f"{t1} {m1}",
        ylabel=f"{t2} {m2}",
        title=f"{table.dataset} ({table.architecture}): trade-off (test, mean over seeds)",
    )
    ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(alpha=0.3)
    return save_figure(fig, out)


def _front(points: Mapping[str, tuple[float, float]], h1: bool, h2: bool) -> list[str]:
    s1, s2 = (1 if h1 else -1), (1 if h2 else -1)

    def dominates(p: tuple[float, float], q: tuple[float, float]) -> bool:
        return s1 * p[0] >= s1 * q[0] and s2 * p[1] >= s2 * q[1] and p != q

    return [m for m, p in points.items() if not any(dominates(q, p) for q in points.values())]


def plot_time_to_quality(
    results: Mapping[str, dict[str, Any]], table: DatasetTable, out: Path
) -> Path | None:
    """Validation Δm% after each epoch against training seconds (means over seeds), per method."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    cmap = plt.get_cmap("tab20")
    drawn = 0
    for i, r in enumerate(table.rows):
        runs = _runs(results, table, r.method)
        curves = [[(e["seconds"], e.get("val/delta_m", math.nan)) for e in run["epochs"]] for run in runs]
        if not curves or not all(curves):
            continue
        length = min(len(c) for c in curves)
        xs = [statistics.fmean(c[j][0] for c in curves) for j in range(length)]
        ys = [statistics.fmean(c[j][1] for c in curves) for j in range(length)]
        if all(math.isnan(y) for y in ys):
            continue
        style = "-" if i < 20 else "--"
        ax.plot(xs, ys, style, marker="o", ms=3, lw=1, color=cmap(i % 20), label=r.method)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(0.0, color="k", lw=0.6)
    # frame the bulk of the methods: curves far below are cut (their values are in the table)
    values = sorted(y for line in ax.get_lines() for y in line.get_ydata() if not math.isnan(y))
    low, high = values[int(0.15 * (len(values) - 1))], max(max(values), 0.0)
    ax.set_ylim(low - 0.1 * (high - low or 1.0), high + 0.1 * (high - low or 1.0))
    ax.set(
        xlabel="training wall seconds",
        ylabel="validation Δm% (↑)",
        title=f"{table.dataset} ({table.architecture}): time to quality (lowest 15% of points cut)",
    )
    ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(alpha=0.3)
    return save_figure(fig, out)


def write_plots(suite: SuiteConfig, results: Mapping[str, dict[str, Any]], folder: Path) -> list[Path]:
    """Every figure of the suite into ``folder``; returns the files written."""
    written: list[Path | None] = []
    for t in build_tables(suite, results):
        stem = f"{_slug(t.dataset)}_{_slug(t.architecture)}"
        written.append(
            plot_traces(
                results,
                t,
                "weight/",
                folder / f"{stem}_weights.png",
                f"{t.dataset}: task weights over training",
            )
        )
        written.append(
            plot_traces(
                results,
                t,
                "cosine/",
                folder / f"{stem}_cosines.png",
                f"{t.dataset}: gradient cosines over training",
            )
        )
        written.append(plot_pareto(results, t, folder / f"{stem}_pareto.png"))
        written.append(plot_time_to_quality(results, t, folder / f"{stem}_time_to_quality.png"))
    return [p for p in written if p is not None]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()
