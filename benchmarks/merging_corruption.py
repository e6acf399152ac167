"""Corrupted task vectors on a merging track: Task Arithmetic against the robust merges and the
few-shot realignment when every task vector arrives with Gaussian noise, or one contributor is an
adversary.

    python benchmarks/merging_corruption.py --track mlp8 --seeds 0 1 2 --out benchmarks/results/merging_corruption_mlp8.md

Settings: noise at ``--snr`` decibels per tensor on every task vector (``gaussian_corruption``), and
one adversarial contributor (the first task's expert) sending ``-3 tau`` (sign flip), ``-sum`` of the
others' task vectors (cancel) or noise of 3 times its task vector's norm. Merges: Task Arithmetic,
``robust_ta`` with the coordinate median, the trimmed mean (one per side), norm clipping and
Multi-Krum (one assumed bad), each with its scale chosen on the validation split (the defender
sees only the received vectors); and the few-shot realignment (R-MTLLMF's defence, reconstructed):
Task Arithmetic's layer-wise coefficients refitted from 0.3 on five labelled validation images per
class and task (``adamerging``, ``objective="labels"``, 200 steps, lr 1e-2). Test accuracy (%) on
average over the eight tasks.
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

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mtlkit.bench.merging_track import (
    SCALING_GRID,
    MergingTrack,
    backbone_state,
    efficientnet_lite0_track,
    mean,
    mlp8_track,
)
from mtlkit.merging import adversarial_contributor, gaussian_corruption, merge, select_scaling
from tables import mean_sd

MERGES: list[tuple[str, str, dict[str, Any]]] = [
    ("Task Arithmetic", "task_arithmetic", {}),
    ("median", "robust_ta", {"aggregate": "median"}),
    ("trimmed mean", "robust_ta", {"aggregate": "trimmed_mean", "trim": 1}),
    ("norm clipping", "robust_ta", {"aggregate": "norm_clip"}),
    ("Multi-Krum", "robust_ta", {"aggregate": "krum", "byzantine": 1}),
]


def few_shot(track: MergingTrack, shots: int = 5) -> dict[str, list[Any]]:
    """Five labelled validation images per class of every task, one batch per task."""
    out = {}
    for t, task in track.tasks.items():
        picks = [torch.nonzero(task.val.labels == c).flatten()[:shots] for c in range(task.num_classes)]
        index = torch.cat(picks)
        out[t] = [(task.val.images[index], task.val.labels[index])]
    return out


def evaluate(track: MergingTrack, experts: dict[str, Any]) -> dict[str, float]:
    row = {}
    for label, name, options in MERGES:
        found = select_scaling(
            track.pretrained, experts, name, track.validation_score, values=SCALING_GRID, **options
        )
        row[label] = mean(track.accuracy(found.result.state_dict))
    headed = {t: track.headed(s) for t, s in experts.items()}
    realigned = merge(
        track.headed(track.pretrained),
        headed,
        "adamerging",
        data=few_shot(track),
        objective="labels",
        steps=200,
        lr=1e-2,
    ).state_dict
    row["few-shot realignment"] = mean(track.accuracy(backbone_state(realigned)))
    return row


def run_seed(track: MergingTrack, snrs: list[float]) -> dict[str, Any]:
    settings: dict[str, Any] = {"clean": evaluate(track, track.experts)}
    for snr in snrs:
        print(f"  SNR {snr:g} dB", flush=True)
        noisy = gaussian_corruption(track.pretrained, track.experts, snr, seed=track.seed)
        settings[f"noise, SNR {snr:g} dB"] = evaluate(track, noisy)
    first = next(iter(track.experts))
    for kind, scale in (("sign_flip", 3.0), ("cancel", 1.0), ("noise", 3.0)):
        print(f"  adversary {kind}", flush=True)
        attacked = adversarial_contributor(
            track.pretrained, track.experts, first, kind, scale, seed=track.seed
        )
        settings[f"one adversary: {kind}" + (f" x{scale:g}" if scale != 1 else "")] = evaluate(
            track, attacked
        )
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--track", choices=["mlp8", "efficientnet_lite0"], default="mlp8")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--snr", type=float, nargs="+", default=[20.0, 10.0, 0.0, -10.0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    build = mlp8_track if args.track == "mlp8" else efficientnet_lite0_track
    seeds = []
    start = time.perf_counter()
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        seeds.append(run_seed(build(seed), args.snr))
        args.out.with_suffix(".json").write_text(
            json.dumps({"seeds": args.seeds, "results": seeds}, indent=1)
        )
    columns = [label for label, _, _ in MERGES] + ["few-shot realignment"]
    command = f"python benchmarks/merging_corruption.py --track {args.track} --seeds {' '.join(map(str, args.seeds))}"
    lines = [
        f"# Corrupted task vectors: {args.track} track, seeds {', '.join(map(str, args.seeds))}",
        "",
        f"`{command}` · torch {torch.__version__}, {platform.processor() or platform.machine()}, one thread, "
        f"{time.perf_counter() - start:.0f} s, load average at the end {os.getloadavg()[0]:.2f}",
        "",
        "Average test accuracy (%) over the eight tasks, mean ± sd over seeds; every merge's scale chosen on "
        "the validation split from the received (corrupted) task vectors; settings in the script's docstring.",
        "",
        "| received task vectors | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for setting in seeds[0]:
        lines.append(
            f"| {setting} | "
            + " | ".join(mean_sd([s[setting][c] for s in seeds], ".1f") for c in columns)
            + " |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
