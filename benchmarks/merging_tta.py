"""Test-time-adaptation merging on a merging track: AdaMerging, Concrete TA and Concrete AdaMerging,
their objectives, and the supervised control, each fitted on the *validation* split's inputs and
scored on the test split.

    python benchmarks/merging_tta.py --track mlp8 --seeds 0 1 2 --out benchmarks/results/merging_tta_mlp8.md

Rows: Task Arithmetic at 0.3 (every TTA method's starting point), Task Arithmetic at its
validation-chosen scale (the data-free reference), then AdaMerging task- and layer-wise with the
paper's entropy objective, layer-wise with the experts' pseudo-labels (ours), layer-wise with the
validation labels (a supervised control, not a TTA method), Concrete TA and Concrete AdaMerging
(layer-wise, entropy). Settings are the official ones (Adam lr 1e-3; 1000 steps for AdaMerging and
each Concrete AdaMerging stage, 2000 for Concrete TA) unless ``--steps`` scales them down, batch 16
of each task's validation images per step. Per row: test accuracy per task and on average, the
change from the 0.3 start, seconds and peak resident memory above the start of the merge.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from peak_memory import fix_mmap_threshold, measured

if __name__ == "__main__":
    fix_mmap_threshold()

import torch

from mtlkit.bench.image_tasks import TASKS
from mtlkit.bench.merging_track import (
    SCALING_GRID,
    MergingTrack,
    backbone_state,
    efficientnet_lite0_track,
    mean,
    mlp8_track,
)
from mtlkit.merging import merge, select_scaling
from tables import mean_sd


def rows(steps: float) -> list[tuple[str, str, dict[str, Any]]]:
    def n(count: int) -> int:
        return max(1, round(count * steps))

    return [
        ("AdaMerging, task-wise (entropy)", "adamerging", {"granularity": "task", "steps": n(1000)}),
        ("AdaMerging, layer-wise (entropy)", "adamerging", {"steps": n(1000)}),
        (
            "AdaMerging, layer-wise (expert pseudo-labels; ours)",
            "adamerging",
            {"objective": "expert_labels", "steps": n(1000)},
        ),
        (
            "supervised control: layer-wise, validation labels",
            "adamerging",
            {"objective": "labels", "steps": n(1000)},
        ),
        ("Concrete TA (entropy)", "concrete_ta", {"steps": n(2000)}),
        (
            "Concrete AdaMerging, layer-wise (entropy)",
            "concrete_adamerging",
            {"steps": n(1000), "adamerging_steps": n(1000)},
        ),
    ]


def run_seed(track: MergingTrack, steps: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    start = merge(track.pretrained, track.experts, "task_arithmetic", scaling=0.3).state_dict
    results["Task Arithmetic, scaling 0.3 (the TTA start)"] = {"accuracy": track.accuracy(start)}
    found = select_scaling(
        track.pretrained, track.experts, "task_arithmetic", track.validation_score, values=SCALING_GRID
    )
    best = found.result.state_dict
    results["Task Arithmetic, validation-chosen scaling"] = {
        "accuracy": track.accuracy(best),
        "scale": found.best,
    }
    headed = {t: track.headed(s) for t, s in track.experts.items()}
    for label, name, options in rows(steps):
        print(f"  {label}", flush=True)
        labels = options.get("objective") == "labels"  # the supervised control reads the labels too
        data = {t: track.validation_batches(t, labels=labels) for t in track.tasks}

        def run(name: str = name, options: dict[str, Any] = options, data: dict[str, Any] = data) -> Any:
            return merge(track.headed(track.pretrained), headed, name, data=data, **options)

        result, seconds, peak = measured(run)
        results[label] = {
            "accuracy": track.accuracy(backbone_state(result.state_dict)),
            "seconds": seconds,
            "peak_mib": peak,
            "first_loss": result.extras.get("first_loss"),
            "last_loss": result.extras.get("last_loss"),
        }
    base = mean(results["Task Arithmetic, scaling 0.3 (the TTA start)"]["accuracy"])
    for row in results.values():
        row["average"] = mean(row["accuracy"])
        row["change"] = row["average"] - base
    return results


def report(track: str, seeds: list[dict[str, Any]], ids: list[int], command: str) -> str:
    labels = list(seeds[0])
    lines = [
        f"# Test-time-adaptation merging: {track} track, seeds {', '.join(map(str, ids))}",
        "",
        f"`{command}` · torch {torch.__version__}, {platform.processor() or platform.machine()}, one thread, "
        f"load average at the end {os.getloadavg()[0]:.2f}",
        "",
        "Test accuracy (%), mean ± sd over seeds; every TTA method reads the validation split's inputs (the "
        "supervised control its labels too), never the test split. *change*: the average minus Task "
        "Arithmetic's at 0.3, where every TTA method starts.",
        "",
        "| method | " + " | ".join(TASKS) + " | average | change | seconds | peak MiB |",
        "|" + "---|" * (len(TASKS) + 5),
    ]
    for label in labels:
        rs = [s[label] for s in seeds]
        cells = [mean_sd([r["accuracy"][t] for r in rs], ".1f") for t in TASKS]
        seconds = mean_sd([r["seconds"] for r in rs], ".0f") if "seconds" in rs[0] else ""
        peak = mean_sd([r["peak_mib"] for r in rs], ".0f") if "peak_mib" in rs[0] else ""
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | **{mean_sd([r['average'] for r in rs], '.1f')}** | {mean_sd([r['change'] for r in rs], '+.1f')}"
            + f" | {seconds} | {peak} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--track", choices=["mlp8", "efficientnet_lite0"], default="mlp8")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=float, default=1.0, help="fraction of the official step counts")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    build = mlp8_track if args.track == "mlp8" else efficientnet_lite0_track
    seeds = []
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        started = time.perf_counter()
        seeds.append(run_seed(build(seed), args.steps))
        print(f"seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
        args.out.with_suffix(".json").write_text(
            json.dumps({"seeds": args.seeds, "results": seeds}, indent=1)
        )
    command = (
        f"python benchmarks/merging_tta.py --track {args.track} --seeds {' '.join(map(str, args.seeds))}"
    )
    if args.steps != 1.0:
        command += f" --steps {args.steps}"
    args.out.write_text(report(args.track, seeds, args.seeds, command))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
