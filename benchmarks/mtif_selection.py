"""MTIF data selection on real data: drop the auxiliary tasks' training labels whose influence on the
target task's validation loss is harmful, retrain from the same initialisation, and compare the
target's test metric with no removal, with as many labels removed at random, and with the whole
auxiliary task removed (single-task training with the same network).

For each seed: a shared-bottom MLP trained with EW (Adam 1e-3) on the full data; MTIF scores of
every training label on the target's validation loss at the trained weights (``--solver``, on the
last shared layer and the task towers); then the retrains, each from the first run's
initialisation with the same batch order. Rules: ``negative`` (every auxiliary label with a
negative normalisation-aware score), the same with the standard first-order score (``H^{-1} g / N``,
whose scores inside a harmful task are mostly negative, where the normalisation-aware ones sum to
zero within a task), ``q10`` (the 10% lowest-scored auxiliary labels), each with its random control,
and ``task-level`` (every auxiliary task whose MTIF task influence on the target is negative).

With ``--corrupt q`` a fraction ``q`` of every auxiliary task's training labels is corrupted
first (the influence-based data-cleaning setting), and the report gives the share of corrupted
labels among those each rule drops.

usage: python benchmarks/mtif_selection.py --dataset census_income --target income
       python benchmarks/mtif_selection.py --dataset qm9 --target r2 --train-size 48000 --batch-size 256
       python benchmarks/mtif_selection.py --dataset census_income --target income --corrupt 0.3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import mtlkit as mk
from mtlkit.data.base import MultiTaskTensorDataset, loader
from mtlkit.metrics.summary import Summary
from mtlkit.relatedness import drop_points, influence_scores, random_selection, select_points
from tables import write_results


def network(dataset) -> mk.models.SharedBottom:
    return mk.models.SharedBottom(dataset.in_features, dataset.tasks, bottom_dims=[256, 128], tower_dims=[64])


def train(dataset, train_set: MultiTaskTensorDataset, init: dict, seed: int, args) -> mk.Trainer:
    model = network(dataset)
    model.load_state_dict(init)
    trainer = mk.Trainer(
        model,
        dataset.tasks,
        mk.methods.create("ew"),
        torch.optim.Adam(model.parameters(), lr=1e-3),
        device="cpu",
        progress=False,
        seed=seed,
    )
    trainer.fit(loader(train_set, args.batch_size, shuffle=True), epochs=args.epochs)
    return trainer


def target_metric(trainer: mk.Trainer, dataset, target: str) -> tuple[str, float, bool]:
    report = trainer.evaluate(loader(dataset.test, 8192))
    name = next(iter(report.metrics[target]))
    return name, report.metrics[target][name], report.directions[target][name]


def corrupt(dataset, target: str, fraction: float, seed: int) -> tuple[MultiTaskTensorDataset, dict]:
    """The training split with ``fraction`` of each auxiliary task's labels corrupted (seeded):
    ``bce`` labels flipped, ``ce`` labels moved to another class, regression targets permuted among
    the corrupted rows. Returns the split and ``{task: corrupted mask}``."""
    train_set = dataset.train
    g = torch.Generator().manual_seed(10_000 + seed)
    targets, corrupted = dict(train_set.targets), {}
    for task in dataset.tasks:
        if task.name == target:
            continue
        y = targets[task.target_key].clone()
        n = y.shape[0]
        chosen = torch.randperm(n, generator=g)[: int(fraction * n)]
        if task.loss == "bce":
            y[chosen] = 1 - y[chosen]
        elif task.loss == "ce":
            classes = int(y.max()) + 1
            y[chosen] = (y[chosen] + torch.randint(1, classes, (len(chosen),), generator=g)) % classes
        else:
            y[chosen] = y[chosen[torch.randperm(len(chosen), generator=g)]]
        targets[task.target_key] = y
        mask = torch.zeros(n, dtype=torch.bool)
        mask[chosen] = True
        corrupted[task.name] = mask
    return MultiTaskTensorDataset(train_set.inputs, targets, train_set.masks), corrupted


def one_seed(dataset, seed: int, args) -> dict:
    torch.manual_seed(seed)
    init = network(dataset).state_dict()
    train_set, corrupted = dataset.train, {}
    if args.corrupt > 0:
        train_set, corrupted = corrupt(dataset, args.target, args.corrupt, seed)
    start = time.perf_counter()
    full = train(dataset, train_set, init, seed, args)
    seconds = time.perf_counter() - start
    metric, base, higher = target_metric(full, dataset, args.target)
    start = time.perf_counter()
    scores = influence_scores(
        full.model,
        dataset.tasks,
        loader(train_set, 4096),
        loader(dataset.val, 8192),
        solver=args.solver,
        parameters="last",
        seed=seed,
    )
    influence_s = time.perf_counter() - start
    n = len(dataset.train)
    aux = [t for t in dataset.tasks.names if t != args.target]
    target = dataset.tasks.index(args.target)
    harmful = [t for t in aux if float(scores.task_matrix()[dataset.tasks.index(t), target]) < 0]
    rules = {
        "negative": select_points(scores, [args.target], drop="negative"),
        "negative, standard form": select_points(scores, [args.target], drop="negative", normalized=False),
        "q10": select_points(scores, [args.target], drop=0.1),
        "task-level": {t: torch.zeros(n, dtype=torch.bool) for t in harmful},
    }
    keeps = {}
    for rule, keep in rules.items():
        keeps[f"MTIF {rule}"] = keep
        if rule != "task-level":
            keeps[f"random {rule}"] = random_selection(keep, scores, seed=1000 + seed)
    keeps["auxiliary tasks removed"] = {t: torch.zeros(n, dtype=torch.bool) for t in aux}
    out = {"full": base, "metric": metric, "higher": higher, "train_s": seconds, "influence_s": influence_s}
    out["harmful tasks"] = harmful
    out["dropped"] = {}
    out["precision"] = {}
    for label, keep in keeps.items():
        trainer = train(dataset, drop_points(train_set, keep), init, seed, args)
        out[label] = target_metric(trainer, dataset, args.target)[1]
        out["dropped"][label] = sum(int((~m).sum()) for m in keep.values())
        if corrupted and out["dropped"][label]:
            hits = sum(int((~keep[t] & corrupted[t]).sum()) for t in keep if t in corrupted)
            out["precision"][label] = hits / out["dropped"][label]
        print(f"seed {seed} {label}: {out[label]:.5f} (full {base:.5f})", file=sys.stderr)
    out["predicted"] = {
        r: float(scores.predict_removal(k)[dataset.tasks.index(args.target)]) for r, k in rules.items()
    }
    return out


def interval(values: list[float]) -> str:
    summary = Summary.of(values)
    return f"{summary.mean:+.4f}" + ("" if summary.n < 2 else f" ± {summary.half_width:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="census_income")
    parser.add_argument("--target", default="income")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--solver", default="ekfac")
    parser.add_argument("--corrupt", type=float, default=0.0, help="fraction of auxiliary labels to corrupt")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("MTLKIT_THREADS", "2")))
    dataset = mk.data.load(args.dataset)
    if args.train_size is not None and args.train_size < len(dataset.train):
        dataset.train = dataset.train.subset(torch.arange(args.train_size))
    load = os.getloadavg()[0]
    start = time.perf_counter()
    runs = [one_seed(dataset, seed, args) for seed in args.seeds]
    wall = time.perf_counter() - start
    metric, higher = runs[0]["metric"], runs[0]["higher"]
    labels = [k for k in runs[0] if k.startswith(("MTIF", "random", "auxiliary"))]
    sign = 1.0 if higher else -1.0
    lines = [
        f"# MTIF data selection: {args.dataset}, target `{args.target}`",
        "",
        f"Command: `python {' '.join(sys.argv)}`; {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads, load average {load:.2f} before; wall {wall / 60:.1f} min. "
        f"Seeds {args.seeds}.",
        "",
        f"Shared-bottom MLP 256-128, towers 64, EW, Adam 1e-3, {args.epochs} epochs, batch "
        f"{args.batch_size}, {len(dataset.train):,} training rows; MTIF solver `{args.solver}` on the "
        "last shared layer and the towers, scored against the validation split; retrains start from "
        "the full run's initialisation with the same batch order. `gain`: the paired change of the "
        f"target's test {metric} against the full run, signed so that positive is better (mean ± 95% "
        "Student-t interval over seeds)."
        + (
            f" {args.corrupt:.0%} of every auxiliary task's training labels are corrupted (seeded per "
            "seed: binary labels flipped, classes moved, regression targets permuted among the "
            "corrupted rows); `corrupted among dropped` is the fraction of dropped labels that were "
            f"corrupted (chance: {args.corrupt:.2f})."
            if args.corrupt
            else ""
        ),
        "",
        f"Full run: {metric} {statistics.mean(r['full'] for r in runs):.5f} "
        f"(train {statistics.mean(r['train_s'] for r in runs):.0f} s, influence "
        f"{statistics.mean(r['influence_s'] for r in runs):.0f} s per seed).",
        "",
        f"| training data | labels dropped | test {metric} | gain |"
        + (" corrupted among dropped |" if args.corrupt else ""),
        "|---|---|---|---|" + ("---|" if args.corrupt else ""),
    ]
    for label in labels:
        values = [r[label] for r in runs]
        gains = [sign * (r[label] - r["full"]) for r in runs]
        dropped = statistics.mean(r["dropped"][label] for r in runs)
        row = f"| {label} | {dropped:,.0f} | {statistics.mean(values):.5f} | {interval(gains)} |"
        if args.corrupt:
            precision = [r["precision"][label] for r in runs if label in r["precision"]]
            row += f" {statistics.mean(precision):.3f} |" if precision else " — |"
        lines.append(row)
    lines += [
        "",
        "MTIF's first-order prediction of the change of the target's validation loss for each rule "
        "(mean over seeds; negative = predicted to help): "
        + ", ".join(
            f"{r} {statistics.mean(run['predicted'][r] for run in runs):+.2e}" for r in runs[0]["predicted"]
        )
        + ".",
        "",
        "Auxiliary tasks with a negative MTIF task influence on the target, per seed: "
        + "; ".join(", ".join(r["harmful tasks"]) or "none" for r in runs)
        + ".",
    ]
    text = "\n".join(lines) + "\n"
    suffix = f"_corrupt{round(100 * args.corrupt)}" if args.corrupt else ""
    out = args.out or Path(f"benchmarks/results/mtif_selection_{args.dataset}{suffix}.md")
    write_results(out, text, {"args": vars(args) | {"out": str(out)}, "runs": runs})


if __name__ == "__main__":
    main()
