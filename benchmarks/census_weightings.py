"""Every loss weighting on Census-Income with MMoE (3 seeds): per-task test AUC and Δm%.

Each seed trains the two single-task baselines (the Δm% reference of that seed) and then MMoE
with every method, all with the demo's architecture and optimiser (MMoE 8x[64] experts, towers
[32], Adam 1e-3, batch 1024) for ``--epochs`` epochs; the test metrics of the last epoch are
reported (no model selection). Runs are spread over ``--workers`` processes with one thread each.

usage: python benchmarks/census_weightings.py [--epochs 10] [--seeds 0 1 2] [--workers 2]
                                              [--out benchmarks/results/census_weightings.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

from tables import mean_sd

#: method label -> (registry name, options); the official defaults unless stated.
METHODS: dict[str, tuple[str, dict]] = {
    "EW": ("ew", {}),
    "SI": ("si", {}),
    "GLS": ("gls", {}),
    "UW": ("uw", {}),
    "IMTL-L": ("imtl_l", {}),
    "DWA": ("dwa", {}),
    "RLW": ("rlw", {}),
    "GradNorm": ("gradnorm", {}),
    "FAMO": ("famo", {}),
    "STCH": ("stch", {}),
}


def _job(args: tuple) -> dict:
    kind, label, seed, epochs, out = args
    import torch

    torch.set_num_threads(1)
    from mtlkit import data as mk_data
    from mtlkit.cli.demo import demo_config
    from mtlkit.train.config import MethodConfig
    from mtlkit.train.experiment import run

    dataset = mk_data.load_census_income(seed=seed)
    cfg = demo_config(Path(out) / f"seed{seed}" / label, epochs, seed, progress=False)
    cfg.trainer.tensorboard = False
    if kind == "stl":
        result = run(cfg, dataset, task_names=[label.removeprefix("stl-")])
    else:
        name, options = METHODS[label]
        cfg.method = MethodConfig(name, copy.deepcopy(options))
        result = run(cfg, dataset)
    return {
        "kind": kind,
        "label": label,
        "seed": seed,
        "metrics": result.test.metrics,
        "seconds": result.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--runs", type=Path, default=Path("runs/census_weightings"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, default=None, help="re-render a saved run's table")
    args = parser.parse_args()
    tasks = ["income", "never_married"]
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        results, wall = saved["results"], saved["wall_s"]
    else:
        jobs = [("stl", f"stl-{t}", s, args.epochs, str(args.runs)) for s in args.seeds for t in tasks]
        jobs += [("mtl", m, s, args.epochs, str(args.runs)) for s in args.seeds for m in args.methods]
        start = time.perf_counter()
        with mp.get_context("spawn").Pool(args.workers) as pool:
            results = pool.map(_job, jobs, chunksize=1)
        wall = time.perf_counter() - start
    text = report(results, args, tasks, wall)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"results": results, "wall_s": wall}, indent=1))


def report(results: list[dict], args, tasks: list[str], wall: float) -> str:
    from mtlkit.metrics import delta_m

    stl = {
        s: {
            t: r["metrics"][t] for r in results if r["kind"] == "stl" and r["seed"] == s for t in r["metrics"]
        }
        for s in args.seeds
    }
    dirs = {t: {"auc": True, "accuracy": True} for t in tasks}
    rows = {}
    for r in results:
        if r["kind"] != "mtl":
            continue
        dm = delta_m(
            {t: {"auc": r["metrics"][t]["auc"]} for t in tasks},
            {t: {"auc": stl[r["seed"]][t]["auc"]} for t in tasks},
            dirs,
        )
        rows.setdefault(r["label"], []).append((r["metrics"], dm, r["seconds"]))

    head = "| method | " + " | ".join(f"{t} AUC" for t in tasks) + " | Δm% (↑) | train s |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    ref_auc = {t: [stl[s][t]["auc"] for s in args.seeds] for t in tasks}
    lines.append("| single-task | " + " | ".join(mean_sd(ref_auc[t], ".4f") for t in tasks) + " | 0 | |")
    for label in args.methods:
        runs = rows[label]
        aucs = " | ".join(mean_sd([m[t]["auc"] for m, _, _ in runs], ".4f") for t in tasks)
        lines.append(
            f"| {label} | {aucs} | {mean_sd([d for _, d, _ in runs], '+.3f')} | {statistics.mean(s for *_, s in runs):.0f} |"
        )
    setup = (
        f"Census-Income (KDD), test split, MMoE 8x[64] experts, towers [32], Adam 1e-3, batch 1024, "
        f"{args.epochs} epochs, seeds {args.seeds} (mean ± sd over seeds; each seed's Δm% is against "
        f"that seed's single-task models, AUC only, Maninis et al. 2019; positive = better). "
        f"Wall time {wall / 60:.1f} min with {args.workers} workers of one thread."
    )
    return "\n".join(["# Loss weightings on Census-Income", "", setup, "", *lines, ""])


if __name__ == "__main__":
    main()
