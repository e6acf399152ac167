"""Matplotlib figures of training runs from their CSV logs."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

from mtlkit.core.figures import pyplot, save_figure


def _read(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _series(rows: list[dict[str, str]], x: str, y: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        if r.get(y, "") not in ("", None):
            xs.append(float(r[x]))
            ys.append(float(r[y]))
    return xs, ys


def _smooth(ys: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(ys):
        acc += v
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_runs(runs: Mapping[str, Path], out: Path, tasks: list[str], metric: str) -> Path:
    """A 2x2 figure: training loss, validation ``metric`` per task, task weights, gradient cosine."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax_loss, ax_val, ax_w, ax_cos = axes.ravel()
    styles = ["-", "--", ":", "-."]
    for label, run in runs.items():
        steps = _read(Path(run) / "steps.csv")
        epochs = _read(Path(run) / "epochs.csv")
        run_tasks = [t for t in tasks if steps and f"loss/{t}" in steps[0]]
        if steps and run_tasks:
            xs = [float(r["step"]) for r in steps]
            total = [sum(float(r[f"loss/{t}"]) for t in run_tasks) for r in steps]
            ax_loss.plot(xs, _smooth(total, 10), label=label)
        for j, t in enumerate(run_tasks):
            ex, ey = _series(epochs, "epoch", f"val/{t}/{metric}")
            if ex:
                ax_val.plot(ex, ey, styles[j % len(styles)], marker="o", label=f"{label}: {t}")
            wx, wy = _series(steps, "step", f"weight/{t}")
            if wx and len(run_tasks) > 1:
                ax_w.plot(wx, _smooth(wy, 10), styles[j % len(styles)], label=f"{label}: {t}")
        if len(run_tasks) > 1:
            pair = f"cosine/{run_tasks[0]}~{run_tasks[1]}"
            cx, cy = _series(steps, "step", pair)
            if cx:
                ax_cos.plot(cx, _smooth(cy, 10), label=f"{label}: {pair.split('/', 1)[1]}")
    ax_loss.set(title="training loss (sum over tasks, smoothed)", xlabel="step", yscale="log")
    ax_val.set(title=f"validation {metric}", xlabel="epoch")
    ax_w.set(title="task weights (smoothed)", xlabel="step")
    ax_cos.set(title="gradient cosine between tasks (smoothed)", xlabel="step")
    ax_cos.axhline(0.0, color="grey", lw=0.5)
    for ax in axes.ravel():
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return save_figure(fig, out, dpi=110)
