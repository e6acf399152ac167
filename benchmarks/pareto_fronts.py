"""Learned trade-off fronts on Multi-Fashion and MultiMNIST-10k, beside the single-point methods.

Every approach of :mod:`mtlkit.pareto` (COSMOS, PHN-LS, PHN-EPO: one preference-conditioned
model each; linear scalarisation, EPO, PMTL: one MultiLeNet per preference) is trained under the
benchmark suite's protocol for the dataset (``benchmarks/suites/quick.yaml`` for Multi-Fashion:
48,000 training pairs, 3 epochs; ``multi_mnist.yaml`` for MultiMNIST-10k: all 14,000, 5 epochs;
batch 256, Adam lr 1e-3, MultiLeNet), so the fronts sit beside that suite's single-point methods.
The conditioned models are swept over the 25 test preferences of COSMOS and PHN (angles 0.1 to
pi/2 - 0.1, normalised to sum 1), the per-preference approaches trained at 5 preferences on the
quarter circle. Reported on the test split, mean ± sd over seeds: the hypervolume of the two test
cross-entropies against (2, 2) (COSMOS's and PHN's reference point), over the 25 sweep points and
over the conditioned models' points at the 5 training preferences of the others; the hypervolume of
the test accuracies against (0, 0); training seconds (all models of a front).

    python benchmarks/pareto_fronts.py --datasets multi_fashion multi_mnist_10k --seeds 0 1

The single-point methods' accuracies come from the committed suite reports
(``suite_quick.json``, ``suite_multi_mnist.json``). Needs ``make data-images``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mtlkit as mk
from mtlkit.core.preferences import circle_rays
from mtlkit.data.base import loader, seeded_subset
from mtlkit.metrics.pareto import hypervolume, non_dominated
from mtlkit.pareto import APPROACHES, learn_front, plot_fronts, training_preferences

try:
    from benchmarks.tables import mean_sd, write_results
except ImportError:  # run as a script
    from tables import mean_sd, write_results  # type: ignore[no-redef]

RESULTS = Path(__file__).resolve().parent / "results"
#: dataset -> (label, training pairs (None: all), epochs, suite report with its single-point methods)
PROTOCOL = {
    "multi_fashion": ("Multi-Fashion", 48_000, 3, "suite_quick.json"),
    "multi_mnist_10k": ("MultiMNIST-10k", None, 5, "suite_multi_mnist.json"),
}
REFERENCE = (2.0, 2.0)
SWEEP = 25


def sweep_preferences() -> torch.Tensor:
    """COSMOS's and PHN's test preferences: angles 0.1 .. pi/2 - 0.1, normalised to sum 1."""
    return circle_rays(SWEEP, start=0.1, end=math.pi / 2 - 0.1)


@functools.cache
def load(dataset: str, seed: int) -> Any:
    """The dataset's splits for ``seed``, built once and shared by every approach (nothing mutates
    them)."""
    return seeded_subset(mk.data.load(dataset, seed=seed), PROTOCOL[dataset][1], seed)


def run_one(dataset: str, approach: str, seed: int, device: str) -> dict[str, Any]:
    label, _, epochs, _ = PROTOCOL[dataset]
    data = load(dataset, seed)
    train = loader(data.train, batch_size=256, shuffle=True, generator=torch.Generator().manual_seed(seed))
    test = loader(data.test, batch_size=1024)
    fit = learn_front(
        approach,
        model="lenet",
        model_options={"out_features": 10},
        in_features=data.in_features,
        tasks=data.tasks,
        train_loader=train,
        epochs=epochs,
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
        preferences=5,
        seed=seed,
        device=device,
    )
    start = time.perf_counter()
    if fit.approach.conditioned:
        front = fit.front(test, sweep_preferences(), device)
        at_training = fit.front(test, training_preferences(2, 5), device)
    else:
        front = at_training = fit.front(test, device=device)
    losses, accuracy = front.losses(), front.metric("accuracy")
    return {
        "dataset": dataset,
        "approach": approach,
        "seed": seed,
        "models": len(fit.models),
        "train_seconds": fit.seconds,
        "eval_seconds": time.perf_counter() - start,
        "preferences": [p.preference for p in front.points],
        "losses": losses.tolist(),
        "accuracy": accuracy.tolist(),
        "hv_loss": hypervolume(losses, REFERENCE),
        "hv_loss_at_5": hypervolume(at_training.losses(), REFERENCE),
        "hv_accuracy": hypervolume(accuracy, (0.0, 0.0), maximize=[True, True]),
        "non_dominated": int(non_dominated(losses).sum()),
        "label": label,
    }


def suite_points(dataset: str) -> tuple[dict[str, tuple[float, float]], tuple[float, float]]:
    """The single-point methods' mean test accuracies and the single-task point from the suite."""
    import json

    label, _, _, report = PROTOCOL[dataset]
    stored = json.loads((RESULTS / report).read_text())
    table = next(t for t in stored["tables"] if t["dataset"] == label)
    points = {
        name: (row["metrics"]["left/accuracy"]["mean"], row["metrics"]["right/accuracy"]["mean"])
        for name, row in table["methods"].items()
    }
    single = table["single_task"]
    return points, (single["left/accuracy"]["mean"], single["right/accuracy"]["mean"])


def report(rows: list[dict[str, Any]], datasets: list[str], seeds: list[int], command: str) -> str:
    load = os.getloadavg()[0]
    lines = [
        "# Learned trade-off fronts: Multi-Fashion and MultiMNIST-10k",
        "",
        f"`{command}` · torch {torch.__version__}, {platform.machine()}, one thread, seeds {seeds}, "
        f"load average at the end {load:.2f}",
        "",
        "Protocol: the benchmark suite's for each dataset (MultiLeNet, batch 256, Adam lr 1e-3; Multi-Fashion 48,000 "
        "training pairs for 3 epochs, MultiMNIST-10k all 14,000 for 5), every approach alike, so the fronts sit "
        "beside the suite's single-point methods. Conditioned approaches (one model) are swept over 25 test "
        "preferences (COSMOS's and PHN's: angles 0.1 to pi/2 - 0.1); the per-preference approaches train 5 models "
        "(preferences on the quarter circle). *HV loss*: hypervolume of the two test cross-entropies against "
        "(2, 2), larger is better; *at 5*: the conditioned models at the 5 training preferences of the others, "
        "like for like in point count. *HV acc*: hypervolume of the test accuracies against (0, 0). "
        "*non-dominated*: of the front's points, in loss. *train s*: all models of a front. Mean ± sd over seeds. "
        "These are short runs (3-5 epochs, the suite's protocol), not the papers' 100-150 epochs: "
        "the numbers compare the approaches under one CPU budget and are not the published ones.",
        "",
    ]
    for dataset in datasets:
        label = PROTOCOL[dataset][0]
        points, single = suite_points(dataset)
        lines += [
            f"## {label}",
            "",
            "| approach | models | HV loss | HV loss at 5 | HV acc | non-dominated | train s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for approach in APPROACHES:
            mine = [r for r in rows if r["dataset"] == dataset and r["approach"] == approach]
            if not mine:
                continue
            lines.append(
                f"| {approach} ({APPROACHES[approach].paper}) | {mine[0]['models']} | "
                f"{mean_sd([r['hv_loss'] for r in mine])} | {mean_sd([r['hv_loss_at_5'] for r in mine])} | "
                f"{mean_sd([r['hv_accuracy'] for r in mine])} | "
                f"{mean_sd([float(r['non_dominated']) for r in mine], '.1f')} | "
                f"{mean_sd([r['train_seconds'] for r in mine], '.1f')} |"
            )
        best = max(points.items(), key=lambda kv: kv[1][0] * kv[1][1])
        lines += [
            "",
            f"Single points from the suite (test accuracy, mean over its seeds): single-task "
            f"({single[0]:.4f}, {single[1]:.4f}), accuracy HV of that point {single[0] * single[1]:.4f}; "
            f"the best single-point method by that measure is {best[0]} ({best[1][0]:.4f}, {best[1][1]:.4f}), "
            f"HV {best[1][0] * best[1][1]:.4f}.",
            "",
            f"![{dataset} accuracy](pareto_fronts_plots/{dataset}_accuracy.png)",
            f"![{dataset} loss](pareto_fronts_plots/{dataset}_loss.png)",
            "",
        ]
    return "\n".join(lines)


def plots(rows: list[dict[str, Any]], datasets: list[str], out: Path) -> None:
    for dataset in datasets:
        label = PROTOCOL[dataset][0]
        points, single = suite_points(dataset)
        accuracy = {
            a: [np.array(r["accuracy"]) for r in rows if r["dataset"] == dataset and r["approach"] == a]
            for a in APPROACHES
        }
        losses = {
            a: [np.array(r["losses"]) for r in rows if r["dataset"] == dataset and r["approach"] == a]
            for a in APPROACHES
        }
        plot_fronts(
            {a: f for a, f in accuracy.items() if f},
            out / f"{dataset}_accuracy.png",
            labels=("left accuracy", "right accuracy"),
            title=f"{label}: learned fronts and single-point methods (test accuracy)",
            points=points,
            single_task=single,
            maximize=True,
        )
        plot_fronts(
            {a: f for a, f in losses.items() if f},
            out / f"{dataset}_loss.png",
            labels=("left cross-entropy", "right cross-entropy"),
            title=f"{label}: learned fronts (test loss; HV reference (2, 2))",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(PROTOCOL), choices=list(PROTOCOL))
    parser.add_argument("--approaches", nargs="+", default=list(APPROACHES), choices=list(APPROACHES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "pareto_fronts.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for dataset in args.datasets:
        for seed in args.seeds:
            for approach in args.approaches:
                row = run_one(dataset, approach, seed, args.device)
                print(
                    f"{dataset} seed {seed} {approach}: HV {row['hv_loss']:.4f} (at 5: {row['hv_loss_at_5']:.4f}), "
                    f"train {row['train_seconds']:.1f} s",
                    flush=True,
                )
                rows.append(row)
    command = "python benchmarks/pareto_fronts.py " + " ".join(
        [f"--datasets {' '.join(args.datasets)}", f"--seeds {' '.join(map(str, args.seeds))}"]
        + ([f"--approaches {' '.join(args.approaches)}"] if args.approaches != list(APPROACHES) else [])
    )
    plots(rows, args.datasets, args.out.parent / "pareto_fronts_plots")
    write_results(
        args.out, report(rows, args.datasets, args.seeds, command), {"command": command, "runs": rows}
    )


if __name__ == "__main__":
    main()
