"""Reports of a benchmark suite: per-dataset tables with 95% intervals, ranks, and a rank table
across datasets, from the stored results alone (a report never trains).

Intervals are Student-t 95% intervals of the mean over seeds (``mean ± t_{0.975, n-1} s / sqrt(n)``;
with two seeds ``t = 12.71``, so they are wide: they say how little two seeds establish). The best
mean per column is in bold. A method's mean rank on a dataset averages its rank over the task
metric columns and Δm% (1 = best; ties share the mean rank), as in the Nash-MTL and FAMO tables.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtlkit.bench.suite_config import SuiteConfig, methods_for
from mtlkit.metrics.summary import Summary

#: more tasks than this: the table shows the mean of the tasks' main metric instead of one column each
MAX_TASK_COLUMNS = 12


def ranks(values: Mapping[str, float], higher_is_better: bool) -> dict[str, float]:
    """1 = best; ties share their mean rank; NaN values rank last together."""
    order = sorted(values, key=lambda k: _sort_key(values[k], higher_is_better))
    out: dict[str, float] = {}
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and _same(values[order[j + 1]], values[order[i]]):
            j += 1
        for k in order[i : j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def _sort_key(v: float, higher: bool) -> tuple[int, float]:
    return (1, 0.0) if math.isnan(v) else (0, -v if higher else v)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@dataclass
class MethodRow:
    """One method's summaries on one (dataset, architecture)."""

    method: str
    metrics: dict[str, Summary]  # "task/metric" -> summary over seeds
    delta_m: Summary
    seconds: Summary
    memory: Summary
    seeds: int
    failures: list[str]
    mean_rank: float = math.nan


@dataclass
class DatasetTable:
    dataset: str
    architecture: str
    columns: list[tuple[str, str, bool]]  # (task, metric, higher is better): each task's main metric
    baseline: dict[str, Summary]
    baseline_seconds: Summary
    rows: list[MethodRow]


def main_columns(result: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """Each task's main (first) metric and its direction."""
    return [(t, next(iter(d)), d[next(iter(d))]) for t, d in result["directions"].items()]


def build_tables(suite: SuiteConfig, results: Mapping[str, dict[str, Any]]) -> list[DatasetTable]:
    """One table per (dataset, architecture) of the suite, methods in the suite's order."""
    tables = []
    for d in suite.datasets:
        for a in d.architectures:
            mine = [r for r in results.values() if r.get("key", "").startswith(f"{d.title}/{a.title}/")]
            done = [r for r in mine if "error" not in r]
            multi = [r for r in done if r["kind"] == "multi_task"]
            single = [r for r in done if r["kind"] == "single_task"]
            if not multi:
                continue
            columns = main_columns(multi[0])
            if len(columns) > MAX_TASK_COLUMNS:  # many tasks: one column, the mean over tasks
                cells = _mean_cells(columns)
                by_seed: dict[int, dict[str, Any]] = {}
                for r in single:
                    by_seed.setdefault(r["seed"], {"test": {}})["test"].update(r["test"])
                columns = [(f"mean over {len(columns)} tasks", columns[0][1], columns[0][2])]
                key = f"{columns[0][0]}/{columns[0][1]}"
                baseline = {key: Summary.of([cells(r)[key] for r in by_seed.values()])}
            else:
                cells = _task_cells(columns)
                baseline = {
                    f"{t}/{m}": Summary.of([r["test"][t][m] for r in single if r["task"] == t])
                    for t, m, _ in columns
                }
            rows = []
            for method in methods_for(suite, d):
                runs = [r for r in multi if r["method"] == method.title]
                failed = [r for r in mine if "error" in r and f"/{method.title}/" in r["key"]]
                rows.append(
                    MethodRow(
                        method.title,
                        {f"{t}/{m}": Summary.of([cells(r)[f"{t}/{m}"] for r in runs]) for t, m, _ in columns},
                        Summary.of([r.get("delta_m", math.nan) for r in runs]),
                        Summary.of([r["seconds"] for r in runs]),
                        Summary.of([r["peak_memory_mib"] or math.nan for r in runs]),
                        len(runs),
                        [r["error"] for r in failed],
                    )
                )
            _mean_ranks(rows, columns)
            seconds = Summary.of([r["seconds"] for r in single])
            tables.append(DatasetTable(d.title, a.title, columns, baseline, seconds, rows))
    return tables


def _task_cells(columns: Sequence[tuple[str, str, bool]]) -> Any:
    return lambda r: {f"{t}/{m}": r["test"][t][m] for t, m, _ in columns}


def _mean_cells(columns: Sequence[tuple[str, str, bool]]) -> Any:
    """A run's main metric averaged over the tasks labelled in its test split."""
    label = f"mean over {len(columns)} tasks/{columns[0][1]}"

    def cells(r: Mapping[str, Any]) -> dict[str, float]:
        values = [r["test"][t][m] for t, m, _ in columns if t in r["test"]]
        finite = [v for v in values if not math.isnan(v)]
        return {label: statistics.fmean(finite) if finite else math.nan}

    return cells


def _mean_ranks(rows: list[MethodRow], columns: Sequence[tuple[str, str, bool]]) -> None:
    per_row: dict[str, list[float]] = {r.method: [] for r in rows}
    for t, m, higher in columns:
        for method, rank in ranks({r.method: r.metrics[f"{t}/{m}"].mean for r in rows}, higher).items():
            per_row[method].append(rank)
    for method, rank in ranks({r.method: r.delta_m.mean for r in rows}, True).items():
        per_row[method].append(rank)
    for r in rows:
        r.mean_rank = statistics.fmean(per_row[r.method]) if r.seeds else math.nan


def _digits(values: Sequence[float]) -> int:
    finite = [abs(v) for v in values if not math.isnan(v)]
    if not finite:
        return 2
    scale = statistics.median(finite)
    return 4 if scale < 1 else 3 if scale < 10 else 2 if scale < 1000 else 1


def markdown_table(table: DatasetTable) -> str:
    """The table of one (dataset, architecture): test metric per task, Δm%, mean rank, time, memory."""
    cols = table.columns
    digits = {f"{t}/{m}": _digits([r.metrics[f"{t}/{m}"].mean for r in table.rows]) for t, m, _ in cols}
    best = {}
    for t, m, higher in cols:
        values = {r.method: r.metrics[f"{t}/{m}"].mean for r in table.rows}
        best[f"{t}/{m}"] = {
            k for k, v in ranks(values, higher).items() if v == 1 and not math.isnan(values[k])
        }
    best_dm = {k for k, v in ranks({r.method: r.delta_m.mean for r in table.rows}, True).items() if v == 1}
    best_rank = {k for k, v in ranks({r.method: r.mean_rank for r in table.rows}, False).items() if v == 1}
    head = [
        "method",
        *[f"{t} {m} {'↑' if h else '↓'}" for t, m, h in cols],
        "Δm% ↑",
        "mean rank ↓",
        "train s",
        "peak MiB",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = [table.baseline[f"{t}/{m}"].text(digits[f"{t}/{m}"]) for t, m, _ in cols]
    lines.append("| single-task | " + " | ".join(ref) + f" | 0 | | {table.baseline_seconds.text(1)} | |")
    for r in table.rows:
        if not r.seeds:
            why = r.failures[0] if r.failures else "not run"
            lines.append(f"| {r.method} | " + " | ".join(["—"] * (len(cols) + 4)) + f" |  <!-- {why} -->")
            continue
        cells = [
            _bold(r.metrics[f"{t}/{m}"].text(digits[f"{t}/{m}"]), r.method in best[f"{t}/{m}"])
            for t, m, _ in cols
        ]
        cells.append(_bold(r.delta_m.text(2), r.method in best_dm))
        cells.append(_bold(f"{r.mean_rank:.1f}", r.method in best_rank))
        cells += [r.seconds.text(1 if r.seconds.mean < 100 else 0), r.memory.text(0)]
        note = (
            f" ({r.seeds} seed{'s' if r.seeds > 1 else ''}; {len(r.failures)} failed)" if r.failures else ""
        )
        lines.append(f"| {r.method}{note} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _bold(text: str, on: bool) -> str:
    return f"**{text}**" if on and text != "—" else text


def rank_table(tables: Sequence[DatasetTable]) -> str:
    """Each method's rank by mean Δm% per (dataset, architecture), and the average over them."""
    if not tables:
        return ""
    methods = [r.method for r in tables[0].rows]
    per_table = [ranks({r.method: r.delta_m.mean for r in t.rows}, True) for t in tables]
    head = ["method", *[f"{t.dataset} ({t.architecture})" for t in tables], "average rank ↓"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    average = {m: statistics.fmean([r.get(m, math.nan) for r in per_table]) for m in methods}
    for m in sorted(methods, key=lambda k: average[k]):
        cells = [f"{r.get(m, math.nan):.1f}" for r in per_table]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {average[m]:.2f} |")
    return "\n".join(lines)


def report_markdown(
    suite: SuiteConfig,
    results: Mapping[str, dict[str, Any]],
    command: str,
    wall_seconds: float | None,
    trained: int | None = None,
) -> str:
    """The whole report: setup, one table per (dataset, architecture), the rank table, failures."""
    tables = build_tables(suite, results)
    seeds = ", ".join(map(str, suite.seeds))
    parts = [f"# Benchmark suite `{suite.name}`", ""]
    parts.append(f"Command: `{command}`.")
    if wall_seconds is not None:
        parts.append(
            f"Wall time {wall_seconds / 60:.1f} min, {suite.workers} worker(s) of {suite.threads} thread(s)"
            + (
                f", for the {trained} of {len(results)} runs this invocation trained (the others were "
                "stored by earlier invocations)."
                if trained is not None and trained < len(results)
                else "."
            )
        )
    parts += [
        "",
        f"Seeds {seeds}. Cells: mean ± 95% interval over seeds (Student t) of the test metric of the "
        "last epoch (or of the best validation epoch where the dataset's `selection` is `best_val`). "
        "Δm% (Maninis et al., CVPR 2019): mean over tasks of the signed relative change of the task's "
        "metrics (a task with several metrics contributes their mean) against single-task baselines "
        "trained with the same architecture, protocol and seed; "
        "positive = better than single-task. Bold: the best mean per column. Mean rank: over the "
        "task columns and Δm%. `train s`: wall seconds of training (validation included); `peak MiB`: "
        "the peak memory the training steps added (validation excluded; resident memory of the run's "
        "own process on a CPU, allocated memory on CUDA).",
        "",
    ]
    for d in suite.datasets:
        protocol = (
            f"{d.title} (`{d.name}`{', ' + str(d.options) if d.options else ''}): "
            f"{'all training rows' if d.train_size is None else f'{d.train_size:,} training rows'}, "
            f"{d.epochs} epoch(s), batch {d.batch_size}, {d.optimizer.name} lr {d.optimizer.lr:g}"
            f"{f', grad clip {d.grad_clip:g}' if d.grad_clip else ''}, selection `{d.selection}`."
        )
        parts += [f"- {protocol}"]
    for t in tables:
        parts += ["", f"## {t.dataset}, {t.architecture}", "", markdown_table(t)]
    own = {d.title for d in suite.datasets if d.methods is not None}  # other methods: not ranked together
    ranked = [t for t in tables if t.dataset not in own]
    if len(ranked) > 1:
        parts += ["", "## Ranks across datasets (by mean Δm%)", "", rank_table(ranked)]
    failures = sorted((k, r["error"]) for k, r in results.items() if "error" in r)
    if failures:
        parts += ["", "## Failed runs", ""] + [f"- `{k}`: {e}" for k, e in failures]
    return "\n".join(parts) + "\n"


def summary_json(suite: SuiteConfig, results: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The tables as data (means, interval bounds, per-seed values): the golden numbers."""
    out: dict[str, Any] = {"suite": suite.name, "seeds": suite.seeds, "tables": []}
    for t in build_tables(suite, results):
        rows = {}
        for r in t.rows:
            if not r.seeds:
                continue
            rows[r.method] = {
                "delta_m": _summary(r.delta_m),
                "metrics": {k: _summary(v) for k, v in r.metrics.items()},
                "mean_rank": r.mean_rank,
                "seconds": _summary(r.seconds),
                "peak_memory_mib": _summary(r.memory),
            }
        out["tables"].append(
            {
                "dataset": t.dataset,
                "architecture": t.architecture,
                "single_task": {k: _summary(v) for k, v in t.baseline.items()},
                "methods": rows,
            }
        )
    out["runs"] = {
        k: {key: r.get(key) for key in ("seed", "test", "delta_m", "seconds", "peak_memory_mib", "error")}
        for k, r in sorted(results.items())
    }
    return out


def _summary(s: Summary) -> dict[str, float]:
    return {"mean": s.mean, "low": s.low, "high": s.high, "n": s.n}


def write_report(
    suite: SuiteConfig,
    results: Mapping[str, dict[str, Any]],
    command: str,
    wall_seconds: float | None,
    also: Path | None = None,
    trained: int | None = None,
) -> list[Path]:
    """``report-<name>.md``, ``.json`` and ``report-<name>_plots/`` in the suite's output folder (and the same
    beside ``also`` when given); returns the files written."""
    from mtlkit.bench.suite_plots import write_plots

    if wall_seconds is None:  # a report of stored results: keep the command and time that trained them
        try:
            previous = json.loads((Path(suite.output) / f"report-{suite.name}.json").read_text())
            command, wall_seconds = previous["command"], previous["wall_seconds"]
            trained = previous.get("trained_runs")
        except (OSError, ValueError, KeyError):
            pass
    text = report_markdown(suite, results, command, wall_seconds, trained)
    data = summary_json(suite, results)
    data["command"], data["wall_seconds"], data["trained_runs"] = command, wall_seconds, trained
    written: list[Path] = []
    rendered: list[Path] = []
    # named after the suite: suites may share an output folder (and reuse each other's runs)
    for md in [Path(suite.output) / f"report-{suite.name}.md", *([Path(also)] if also else [])]:
        md.parent.mkdir(parents=True, exist_ok=True)
        folder = md.parent / f"{md.stem}_plots"
        if rendered:  # the figures are drawn once, then copied beside the second report
            folder.mkdir(parents=True, exist_ok=True)
            plots = [Path(shutil.copyfile(f, folder / f.name)) for f in rendered]
        else:
            plots = rendered = write_plots(suite, results, folder)
        figures = "\n".join(f"![{p.stem}]({p.parent.name}/{p.name})" for p in plots)
        md.write_text(text + ("\n## Figures\n\n" + figures + "\n" if figures else ""))
        md.with_suffix(".json").write_text(json.dumps(data, indent=1, default=float))
        written += [md, md.with_suffix(".json"), *plots]
    return written
