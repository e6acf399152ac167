"""``mtlkit affinity CONFIG.yaml``: measure task relatedness during one all-in-one training run
(TAG's lookahead affinity, gradient cosines on a fixed validation probe, the accumulated
cross-loss similarity) and after it (MTIF's task-level influence), choose task groups from each
measure, and optionally train the groups against all-in-one and single-task training.

Writes ``affinity.json`` (matrices, agreement, groups, comparison), ``affinity.md`` and
``affinity.png`` (one heat map per measure) to the run's output folder.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from mtlkit import data as mk_data
from mtlkit.core.figures import pyplot, save_figure
from mtlkit.core.tasks import TaskSet
from mtlkit.errors import ConfigError
from mtlkit.metrics.delta import delta_m, per_task_delta
from mtlkit.metrics.summary import Summary
from mtlkit.relatedness.affinity_config import AffinityJob, AffinitySettings
from mtlkit.relatedness.cross_loss import CrossLossSimilarity
from mtlkit.relatedness.gradient_statistics import GradientStatistics
from mtlkit.relatedness.mtif import influence_scores
from mtlkit.relatedness.tag import OFFICIAL_SINGLETON_SCORE, TaskAffinity, group_scores, select_groups
from mtlkit.train.experiment import run

Log = Callable[[str], None]
TITLES = {
    "tag": "TAG lookahead affinity (Z/lr)",
    "cosine": "gradient cosine (probe)",
    "mtif": "MTIF task influence",
    "cross_loss": "cross-loss weight",
}


@dataclass
class AffinityResult:
    tasks: list[str]
    matrices: dict[str, list[list[float]]]
    groups: dict[str, list[list[str]]]
    agreement: dict[str, dict[str, float]]
    comparison: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    mtif: dict[str, Any] = field(default_factory=dict)  # solver, damping, CG residual


def _dataset(job: AffinityJob) -> Any:
    cfg = job.run
    return mk_data.seeded_subset(mk_data.load(cfg.data.name, **cfg.data.options), job.affinity.train_size, 0)


def _with(cfg: Any, output: Path, seed: int) -> Any:
    out = copy.deepcopy(cfg)
    out.output, out.seed = str(output), seed
    return out


def _claim(folder: Path, settings: AffinitySettings) -> None:
    """A killed measuring run resumes from its checkpoint (the measures' state included); one made
    with other affinity settings must not be resumed into this job's results."""
    path = folder / "affinity_settings.json"
    wanted = json.loads(json.dumps(dataclasses.asdict(settings)))
    if path.exists() and json.loads(path.read_text()) != wanted:
        raise ConfigError(
            f"{folder} holds a measuring run made with other affinity settings; use a fresh output directory."
        )
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wanted, indent=1))


def measure(job: AffinityJob, output: Path, log: Log = print) -> tuple[AffinityResult, Any]:
    """One all-in-one run with every measure attached, then MTIF at its final weights."""
    a = job.affinity
    dataset = _dataset(job)
    tasks: TaskSet = dataset.tasks
    probe = dataset.val.__getitems__(list(range(min(a.probe_size, len(dataset.val)))))
    tag = TaskAffinity(every=a.every)
    cosine = GradientStatistics(probe=probe, every=a.every)
    cross = CrossLossSimilarity()
    _claim(output / "measure", a)
    start = time.perf_counter()
    result = run(_with(job.run, output / "measure", a.seeds[0]), dataset, callbacks=[tag, cosine, cross])
    seconds = {"measured run": time.perf_counter() - start}
    log(f"measured run: {seconds['measured run']:.0f} s")
    if not cosine.epoch_means:
        raise ConfigError(
            f"The measured run took {result.trainer.step} steps, fewer than affinity.every ({a.every}): "
            "nothing was measured. Lower affinity.every or train longer."
        )
    matrices = {
        "tag": tag.matrix(),
        "cosine": torch.stack([torch.tensor(m["cos"]) for m in cosine.epoch_means]).mean(0),
        "cross_loss": cross.relatedness(),
    }
    mtif_info: dict[str, Any] = {}
    if a.mtif is not None:
        start = time.perf_counter()
        scores = influence_scores(
            result.trainer.model,
            tasks,
            mk_data.loader(dataset.train, 4096),
            mk_data.loader(dataset.val, job.run.data.eval_batch_size),
            solver=a.mtif.solver,
            parameters=a.mtif.parameters,
            damping=a.mtif.damping,
            curvature=a.mtif.curvature,
            # Adam's and SGD's weight decay is an L2 term of the objective the model minimised
            # (AdamW's decoupled decay is not)
            weight_decay=job.run.optimizer.weight_decay if job.run.optimizer.name.lower() != "adamw" else 0.0,
            seed=a.seeds[0],
            **a.mtif.options,
        )
        matrices["mtif"] = scores.task_matrix()
        mtif_info = {"solver": scores.solver, "damping": scores.damping, "residual": scores.residual}
        seconds["mtif"] = time.perf_counter() - start
        log(f"MTIF ({a.mtif.solver}): {seconds['mtif']:.0f} s")
    names = list(tasks.names)
    groups = {}
    for m in a.group_by:
        chosen, _ = select_groups(matrices[m].double().numpy(), a.budget, singleton_score=a.singleton_score)
        groups[m] = [[names[i] for i in g] for g in chosen]
    out = AffinityResult(
        names,
        {k: v.double().tolist() for k, v in matrices.items()},
        groups,
        agreement(matrices),
        seconds=seconds,
        mtif=mtif_info,
    )
    return out, dataset


def agreement(matrices: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """For each pair of measures, over the off-diagonal (source != target) entries: the fraction
    of directed pairs on which they agree that the source helps (a positive value; for the
    cross-loss weights, which are never negative, a source the filter keeps) and, with more than
    two entries, the Spearman correlation of the values."""
    out: dict[str, dict[str, float]] = {}
    keys = [k for k in TITLES if k in matrices]
    k = next(iter(matrices.values())).shape[0]
    off = ~torch.eye(k, dtype=torch.bool)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            x, y = matrices[a][off].double(), matrices[b][off].double()
            same = (x > 0) == (y > 0)
            entry = {"sign_agreement": float(same.double().mean())}
            if x.numel() > 2 and float(x.std()) > 0 and float(y.std()) > 0:
                entry["spearman"] = float(spearmanr(x.numpy(), y.numpy())[0])
            out[f"{a}~{b}"] = entry
    return out


def _assign(
    groups: Sequence[Sequence[str]],
    matrix: list[list[float]],
    names: list[str],
    singleton_score: float = OFFICIAL_SINGLETON_SCORE,
) -> dict[str, tuple[str, ...]]:
    """TAG's rule: each task is served by the chosen group in which it scores best."""
    a = np.asarray(matrix)
    best: dict[str, tuple[float, tuple[str, ...]]] = {}
    for g in groups:
        idx = [names.index(t) for t in g]
        for j, score in group_scores(a, idx, singleton_score).items():
            t = names[j]
            if t not in best or score > best[t][0]:
                best[t] = (score, tuple(g))
    return {t: best[t][1] for t in names}


def compare(
    job: AffinityJob, result: AffinityResult, dataset: Any, output: Path, log: Log = print
) -> dict[str, Any]:
    """Train all-in-one, single-task and every suggested group for each seed; Δm% against
    single-task for all-in-one and for each measure's grouping."""
    names = result.tasks
    everything = tuple(names)
    singleton = job.affinity.singleton_score
    assignments = {m: _assign(g, result.matrices[m], names, singleton) for m, g in result.groups.items()}
    needed = {everything} | {(t,) for t in names}
    for plan in assignments.values():
        needed |= set(plan.values())
    per_seed: list[dict[str, Any]] = []
    for seed in job.affinity.seeds:
        reports = {}
        for group in sorted(needed, key=lambda g: (len(g), g)):
            slug = "+".join(group) if len(group) < len(names) else "all"
            res = run(
                _with(job.run, output / f"groups/seed{seed}/{slug}", seed), dataset, task_names=list(group)
            )
            reports[group] = res.test
            log(f"seed {seed}, tasks {slug}: trained in {res.seconds:.0f} s")
        single = {t: reports[(t,)].metrics[t] for t in names}
        directions = {t: reports[(t,)].directions[t] for t in names}

        entry: dict[str, Any] = {"seed": seed, "single-task": single}
        entry["all-in-one"] = {t: reports[everything].metrics[t] for t in names}
        for m, plan in assignments.items():
            entry[f"{m} groups"] = {t: reports[plan[t]].metrics[t] for t in names}
        entry["delta_m"] = {
            k: delta_m(entry[k], single, directions)
            for k in ["all-in-one", *(f"{m} groups" for m in assignments)]
        }
        entry["transfer"] = per_task_delta(entry["all-in-one"], single, directions)
        per_seed.append(entry)
    observed = {t: statistics.mean(s["transfer"][t] for s in per_seed) for t in names}
    return {
        "assignments": {m: {t: list(g) for t, g in p.items()} for m, p in assignments.items()},
        "seeds": per_seed,
        "observed_transfer": observed,
        "predicted_transfer": predicted_transfer(result, observed),
    }


def predicted_transfer(result: AffinityResult, observed: dict[str, float]) -> dict[str, dict[str, Any]]:
    """For each measure: the mean affinity onto each task from the others (its predicted transfer
    to that task) and the fraction of tasks where its sign matches the observed transfer (the
    per-task relative change of all-in-one against single-task training)."""
    names = result.tasks
    out: dict[str, dict[str, Any]] = {}
    for key, matrix in result.matrices.items():
        a = np.asarray(matrix)
        onto = {
            t: float(np.mean([a[i, j] for i in range(len(names)) if i != j])) for j, t in enumerate(names)
        }
        if key == "cross_loss":  # weights are never negative: a source kept by the filter counts as helpful
            onto = {t: v if v > 0 else -1.0 for t, v in onto.items()}
        hits = [(onto[t] > 0) == (observed[t] > 0) for t in names]
        out[key] = {"onto": onto, "sign_match": float(np.mean(hits))}
    return out


def plot(result: AffinityResult, path: Path) -> Path:
    plt = pyplot()
    keys = [k for k in TITLES if k in result.matrices]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        m = np.asarray(result.matrices[key])
        off = m[~np.eye(len(m), dtype=bool)]
        scale = float(np.abs(off).max()) if off.size and np.abs(off).max() > 0 else 1.0
        im = ax.imshow(m, cmap="RdBu", vmin=-scale, vmax=scale)
        ax.set_xticks(range(len(result.tasks)), result.tasks, rotation=90)
        ax.set_yticks(range(len(result.tasks)), result.tasks)
        ax.set_xlabel("target")
        ax.set_ylabel("source")
        ax.set_title(TITLES[key], fontsize=9)
        fig.colorbar(im, ax=ax)
    return save_figure(fig, path, dpi=100)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _head(cells: Sequence[str]) -> list[str]:
    """A Markdown table's header row and its separator."""
    return [_row(cells), "|" + "---|" * len(cells)]


def markdown(result: AffinityResult, title: str) -> str:
    lines = [f"# Task relatedness: {title}", ""]
    lines += [
        "Matrices: row = source task, column = target task; positive = the source helps the target.",
        "",
    ]
    for key in [k for k in TITLES if k in result.matrices]:
        lines += [f"## {TITLES[key]}", "", *_head(["source \\ target", *result.tasks])]
        for name, row in zip(result.tasks, result.matrices[key], strict=True):
            lines.append(_row([name, *(f"{v:.3g}" for v in row)]))
        lines.append("")
    lines += ["## Agreement between the measures (off-diagonal entries)", ""]
    lines += [
        "Agreement: the fraction of directed pairs both measures call helpful (value > 0; for the "
        "cross-loss weights, a source the filter keeps) or both harmful. Spearman: of the values.",
        "",
        *_head(["measures", "agreement", "Spearman"]),
    ]
    for pair, v in result.agreement.items():
        rho = f"{v['spearman']:.2f}" if "spearman" in v else "—"
        lines.append(_row([pair, f"{v['sign_agreement']:.2f}", rho]))
    lines += ["", "## Suggested groups", ""]
    for m, groups in result.groups.items():
        lines.append(f"- {m}: " + ", ".join("{" + ", ".join(g) + "}" for g in groups))
    comparison = result.comparison
    if comparison:
        rows = list(comparison["seeds"][0]["delta_m"])
        seeds = [s["seed"] for s in comparison["seeds"]]
        lines += [
            "",
            f"## Grouping against all-in-one (test split, seeds {seeds})",
            "",
            "Δm% against single-task training with the same network (mean ± 95% Student-t interval "
            "over seeds; positive = better than single-task). A task served by a singleton group is "
            "its single-task model.",
            "",
            *_head(["training", *result.tasks, "Δm%"]),
        ]
        for label in ["single-task", *rows]:
            cells = []
            for t in result.tasks:
                values = [next(iter(s[label][t].values())) for s in comparison["seeds"]]
                cells.append(f"{statistics.mean(values):.4g}")
            dm = (
                "0"
                if label == "single-task"
                else Summary.of([s["delta_m"][label] for s in comparison["seeds"]]).text(2)
            )
            lines.append(_row([label, *cells, dm]))
        lines.append("")
        lines.append("Task metrics: the main metric of each task, mean over seeds.")
        observed = comparison["observed_transfer"]
        lines += [
            "",
            "## Predicted against observed transfer",
            "",
            "Observed: the per-task relative change (%) of all-in-one against single-task training "
            "(mean over seeds). Predicted: each measure's mean affinity onto the task from the others "
            "(cross-loss: + where the filter keeps a source). `sign match`: the fraction of tasks where "
            "the two signs agree.",
            "",
            *_head(["", *result.tasks, "sign match"]),
            _row(["observed transfer (%)", *(f"{observed[t]:+.2f}" for t in result.tasks), ""]),
        ]
        for key, v in comparison["predicted_transfer"].items():
            onto = [f"{v['onto'][t]:+.3g}" for t in result.tasks]
            lines.append(_row([key, *onto, f"{v['sign_match']:.2f}"]))
    if result.mtif:
        residual = result.mtif["residual"]
        lines += [
            "",
            f"MTIF: solver `{result.mtif['solver']}`, damping {result.mtif['damping']:.3g}"
            + (f", CG relative residual {residual:.3g}" if residual is not None else "")
            + ".",
        ]
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items()), ""]
    return "\n".join(lines)


def run_affinity(
    job: AffinityJob, title: str | None = None, log: Log = print
) -> tuple[AffinityResult, list[Path]]:
    """Measure, choose groups, optionally compare; write JSON, Markdown and the heat maps."""
    output = Path(job.run.output)
    result, dataset = measure(job, output, log)
    if job.affinity.train_groups:
        result.comparison = compare(job, result, dataset, output, log)
    output.mkdir(parents=True, exist_ok=True)
    paths = [output / "affinity.json", output / "affinity.md", output / "affinity.png"]
    paths[0].write_text(json.dumps(result.__dict__, indent=1))
    paths[1].write_text(markdown(result, title or job.run.data.name))
    plot(result, paths[2])
    return result, paths
