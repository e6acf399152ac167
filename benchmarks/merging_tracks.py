"""Merging benchmark on the MLP-8 track (or the EfficientNet-Lite0 track): every merging method on
eight real image tasks, scales chosen on validation data, over seeds.

    python benchmarks/merging_tracks.py --track mlp8 --seeds 0 1 2 --out benchmarks/results/merging_mlp8.md

Per method and seed: test accuracy per task, the average, the normalised average (accuracy over the
individual expert's, averaged over tasks), the validation-chosen scale, the wall time of the
selection plus the final merge, and the peak resident memory during it above its start (the
kernel's peak counter, reset before each method). References: the pretrained backbone with its
few-shot heads, the individual experts, and joint multi-task training. EMR is task-routed (it needs
the task id at inference), so it is reported apart from the single-model methods.

The report ends with the merging notes' acceptance gates: the experts beat the pretrained model by
>= 20 points; the best data-free merge beats it by >= 3; validation-chosen scales are interior to
their grids; some pair of method families differs by more than 2 seed-standard deviations.
One thread, as every benchmark here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from peak_memory import fix_mmap_threshold, measured

if __name__ == "__main__":  # before torch is imported: glibc reads the setting at start
    fix_mmap_threshold()

import torch
from torch import nn

from mtlkit.bench.image_tasks import TASKS
from mtlkit.bench.merging_track import (
    SCALING_GRID,
    MergingTrack,
    backbone_state,
    efficientnet_lite0_track,
    mean,
    mlp8_track,
    normalised,
)
from mtlkit.merging import merge, select_scaling
from tables import mean_sd


@dataclass
class Method:
    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    search: bool = False  # choose ``scaling`` on validation
    data: str | None = None  # "inputs" (RegMean), "labelled" (Fisher, via the headed models)
    family: str = "data-free"
    tracks: tuple[str, ...] = ("mlp8", "efficientnet_lite0")
    needs_linear: bool = False  # RegMean solves nn.Linear layers only (a CNN has none)


METHODS = [
    Method("weight averaging", "average", family="averaging"),
    Method("Task Arithmetic, scaling 0.3 (fixed)", "task_arithmetic", {"scaling": 0.3}, family="TA"),
    Method("Task Arithmetic", "task_arithmetic", search=True, family="TA"),
    Method("TIES (top 20% global, mass, disjoint mean)", "ties", search=True, family="sparsify"),
    Method("DARE + TA (drop 0.5)", "dare", search=True, family="sparsify"),
    Method("DARE + TIES (drop 0.5)", "dare", {"combine": "ties"}, search=True, family="sparsify"),
    Method("Model Breadcrumbs (drop bottom 10%, top 1%)", "breadcrumbs", search=True, family="sparsify"),
    Method("DELLA (density 0.5, epsilon 0.1)", "della", search=True, family="sparsify"),
    Method("MetaGPT (whole-model norms)", "metagpt", family="TA"),
    Method("TSV-M", "tsv", search=True, family="subspace"),
    Method("Iso-C", "iso_c", search=True, family="subspace"),
    Method("Iso-CTS", "iso_cts", search=True, family="subspace"),
    Method("WUDI (official: 300 steps, lr 1e-5)", "wudi", family="subspace", tracks=("mlp8",)),
    Method("WUDI (300 steps, lr 1e-4)", "wudi", {"lr": 1e-4}, family="subspace", tracks=("mlp8",)),
    # on a CNN most of the update is outside the linear maps (depthwise kernels, BatchNorm affine):
    # the official "others = pretrained" would throw it away, so those take the mean task vector
    Method(
        "WUDI (official steps and lr; others: mean task vector)",
        "wudi",
        {"others": "mean"},
        family="subspace",
        tracks=("efficientnet_lite0",),
    ),
    Method(
        "WUDI (lr 1e-4; others: mean task vector)",
        "wudi",
        {"lr": 1e-4, "others": "mean"},
        family="subspace",
        tracks=("efficientnet_lite0",),
    ),
    Method("DOGE (lamda chosen on validation; 400 steps, lr 1e-4)", "doge", search=True, family="subspace"),
    Method("Model Stock", "model_stock", family="averaging"),
    Method(
        "Fisher (empirical, 256 examples)", "fisher", {"fisher": "empirical"}, data="labelled", family="data"
    ),
    Method("RegMean (alpha 0.95, 256 examples)", "regmean", data="inputs", family="data", needs_linear=True),
    Method(
        "RegMean++ (alpha 0.95, 256 examples)",
        "regmean_plusplus",
        data="inputs",
        family="data",
        needs_linear=True,
    ),
]


def run_method(track: MergingTrack, method: Method, grid: tuple[float, ...]) -> dict[str, Any]:
    """Choose the scale on validation (when the method has one), then merge once more with the
    chosen options under the time and memory meters; test accuracy of that merge."""

    options = dict(method.options)
    scale, boundary, search_seconds = None, False, None
    if method.search:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the boundary is reported in the table instead
            found = select_scaling(
                track.pretrained, track.experts, method.name, track.validation_score, values=grid, **options
            )
        search_seconds = time.perf_counter() - start
        scale, boundary = found.best, found.on_boundary
        options["scaling"] = found.best
        del found

    def run() -> dict[str, torch.Tensor]:
        if method.data == "inputs":
            data = {t: track.batches(t) for t in track.experts}
            model = track.make_backbone()
            return merge(
                track.pretrained, track.experts, method.name, data=data, model=model, **options
            ).state_dict
        if method.data == "labelled":
            experts = {t: track.headed(s) for t, s in track.experts.items()}
            data = {t: track.batches(t, labels=True) for t in track.experts}
            return backbone_state(merge(None, experts, method.name, data=data, **options).state_dict)
        return merge(track.pretrained, track.experts, method.name, **options).state_dict

    state, seconds, peak = measured(run)
    return {
        "accuracy": track.accuracy(state),
        "scale": scale,
        "on_boundary": boundary,
        "search_seconds": search_seconds,
        "seconds": seconds,
        "peak_mib": peak,
    }


def applicable(track: MergingTrack, method: Method) -> bool:
    if track.name not in method.tracks:
        return False
    modules = list(track.make_backbone().modules())
    if method.needs_linear and not any(isinstance(m, nn.Linear) for m in modules):
        return False
    return method.name != "regmean_plusplus" or isinstance(modules[0], nn.Sequential)


def run_seed(track: MergingTrack, methods: list[Method], grid: tuple[float, ...]) -> dict[str, Any]:
    individual = track.accuracy(lambda t: track.experts[t])
    rows: dict[str, Any] = {
        "pretrained backbone + few-shot heads": {"accuracy": track.accuracy(track.pretrained)},
        "individual experts (one per task)": {"accuracy": individual},
        "joint multi-task training (equal weights)": {"accuracy": track.accuracy(track.joint)},
    }
    for method in methods:
        print(f"  {method.label}", flush=True)
        rows[method.label] = run_method(track, method, grid)
    emr, seconds, peak = measured(lambda: merge(track.pretrained, track.experts, "emr"))
    rows["EMR (task-routed: needs the task id)"] = {
        "accuracy": track.accuracy(lambda t: emr.for_task(t)),
        "seconds": seconds,
        "peak_mib": peak,
    }
    for row in rows.values():
        row["average"] = mean(row["accuracy"])
        row["normalised"] = normalised(row["accuracy"], individual)
    return {"rows": rows, "track_seconds": track.seconds}


def gates(seeds: list[dict[str, Any]], methods: list[Method]) -> list[str]:
    def avg(label: str) -> list[float]:
        return [s["rows"][label]["average"] for s in seeds]

    pre = avg("pretrained backbone + few-shot heads")
    ind = avg("individual experts (one per task)")
    gap = statistics.mean(ind) - statistics.mean(pre)
    free = [m for m in methods if m.data is None]
    if not free:
        return ["- gates need at least one data-free method in the run."]
    best_free = max(free, key=lambda m: statistics.mean(avg(m.label)))
    lift = statistics.mean(avg(best_free.label)) - statistics.mean(pre)
    edges = [m.label for m in methods if m.search and any(s["rows"][m.label]["on_boundary"] for s in seeds)]
    families: dict[str, list[float]] = {}
    for m in methods:
        best = families.get(m.family)
        if best is None or statistics.mean(avg(m.label)) > statistics.mean(best):
            families[m.family] = avg(m.label)
    separated = []
    names = sorted(families)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = abs(statistics.mean(families[a]) - statistics.mean(families[b]))
            sd = max(statistics.stdev(families[a]), statistics.stdev(families[b])) if len(seeds) > 1 else 0.0
            if len(seeds) > 1 and diff > 2 * sd:
                separated.append(f"{a} / {b} ({diff:.1f} points, 2 sd = {2 * sd:.1f})")

    def mark(ok: bool) -> str:
        return "pass" if ok else "FAIL"

    return [
        f"- (a) experts beat the pretrained model by >= 20 points: {mark(gap >= 20)} ({gap:.1f} points).",
        f"- (b) the best data-free merge beats the pretrained model by >= 3 points: {mark(lift >= 3)} "
        f"({best_free.label}: {lift:+.1f} points).",
        f"- (c) validation-chosen scales interior to the grid: {mark(not edges)}"
        + (f" (on the edge in some seed: {', '.join(edges)})." if edges else "."),
        f"- (d) some pair of method families (best method of each) differs by more than 2 seed-sd: "
        f"{mark(bool(separated))}" + (f" ({'; '.join(separated)})." if separated else "."),
    ]


def report(
    track_name: str,
    seeds: list[dict[str, Any]],
    ids: list[int],
    methods: list[Method],
    meta: str,
    grid: tuple[float, ...],
    skipped: list[str],
) -> str:
    labels = list(seeds[0]["rows"])
    head = (
        "| method | "
        + " | ".join(TASKS)
        + " | average | normalised | scale | search s | merge s | peak MiB |"
    )
    lines = [
        f"# Merging benchmark: {track_name} track, seeds {', '.join(map(str, ids))}",
        "",
        meta,
        "",
        "Test accuracy (%), mean ± sd over seeds. *normalised*: accuracy over the individual expert's, "
        f"averaged over tasks. *scale*: the validation-chosen scaling (grid {grid[0]}..{grid[-1]}, "
        f"{len(grid)} values; an asterisk marks a choice on the grid's edge in some seed). *search s*: "
        "the whole validation search (merges and evaluations); *merge s* and *peak MiB*: one merge with the "
        "chosen settings, its peak resident memory above its start (the data-aware methods include their "
        "statistics). One thread.",
        "",
        head,
        "|" + "---|" * (len(TASKS) + 7),
    ]
    for label in labels:
        rows = [s["rows"][label] for s in seeds]
        cells = [mean_sd([r["accuracy"][t] for r in rows], ".1f") for t in TASKS]
        scale = ""
        if rows[0].get("scale") is not None:
            scale = mean_sd([r["scale"] for r in rows], ".2f") + (
                "*" if any(r["on_boundary"] for r in rows) else ""
            )
        seconds = mean_sd([r["seconds"] for r in rows], ".2f") if "seconds" in rows[0] else ""
        search = mean_sd([r["search_seconds"] for r in rows], ".0f") if rows[0].get("search_seconds") else ""
        peak = mean_sd([r["peak_mib"] for r in rows], ".0f") if "peak_mib" in rows[0] else ""
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | **{mean_sd([r['average'] for r in rows], '.1f')}** | {mean_sd([r['normalised'] for r in rows], '.1f')}"
            + f" | {scale} | {search} | {seconds} | {peak} |"
        )
    if skipped:
        lines += ["", "Not applicable on this track: " + "; ".join(skipped) + "."]
    lines += ["", "## Acceptance gates (merging notes)", "", *gates(seeds, methods), ""]
    build = seeds[0]["track_seconds"]
    lines.append(
        "Building the track (seed "
        + str(ids[0])
        + "): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in build.items())
        + " (cached as safetensors after the first run)."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--track", choices=["mlp8", "efficientnet_lite0"], default="mlp8")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", help="labels' registry names to run (default: all)")
    parser.add_argument(
        "--grid", type=float, nargs="+", default=list(SCALING_GRID), help="scaling values to try"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    grid = tuple(sorted(args.grid))
    build = mlp8_track if args.track == "mlp8" else efficientnet_lite0_track
    args.out.parent.mkdir(parents=True, exist_ok=True)
    seeds: list[dict[str, Any]] = []
    methods: list[Method] = []
    skipped: list[str] = []
    for seed in args.seeds:
        print(f"seed {seed}: building the track", flush=True)
        track = build(seed)
        wanted = [m for m in METHODS if not args.methods or m.name in args.methods]
        methods = [m for m in wanted if applicable(track, m)]
        skipped = [
            f"{m.label} ({'no nn.Linear layer' if m.needs_linear else 'another track'})"
            for m in wanted
            if m not in methods and track.name in m.tracks
        ]
        seeds.append(run_seed(track, methods, grid))
        # written after every seed: a long run that stops keeps what it measured
        args.out.with_suffix(".json").write_text(
            json.dumps({"seeds": args.seeds, "results": seeds}, indent=1)
        )
    command = (
        f"python benchmarks/merging_tracks.py --track {args.track} --seeds {' '.join(map(str, args.seeds))}"
    )
    if args.methods:
        command += " --methods " + " ".join(args.methods)
    if grid != SCALING_GRID:
        command += " --grid " + " ".join(map(str, grid))
    meta = (
        f"`{command}` · "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, one thread, "
        f"load average at the end {os.getloadavg()[0]:.2f}"
    )
    args.out.write_text(report(args.track, seeds, args.seeds, methods, meta, grid, skipped))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
