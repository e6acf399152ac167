"""Every gated/hard-sharing architecture on Census-Income (3 seeds, EW and UPGrad): per-task test
AUC, Δm% against single-task baselines, parameters and wall time per epoch.

Each seed trains the two single-task baselines (a SharedBottom with one task, the Δm% reference
of that seed), then every architecture with each method, all with the demo's optimiser (Adam
1e-3, batch 1024) for ``--epochs`` epochs. Two protocols are reported from the same runs: the
model after the last epoch (no model selection), and the model of the epoch with the lowest summed
validation loss. Runs are spread over ``--workers`` processes with one thread each.

ESMM and AITM are not run: they model a conversion funnel (a later task implies the earlier one,
CTCVR = CTR x CVR), and Census-Income's tasks (income > 50K, never married) are not one.

usage: python benchmarks/census_architectures.py [--epochs 10] [--seeds 0 1 2] [--workers 2]
                                                 [--out benchmarks/results/census_architectures.md]
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

#: label -> (registry name, options): sizes in the range of the MMoE paper's Census models,
#: every expert [64] wide with [32] towers as in the demo
MODELS: dict[str, tuple[str, dict]] = {
    "SharedBottom": ("shared_bottom", {"bottom_dims": [128, 64], "tower_dims": [32]}),
    "MMoE": ("mmoe", {"num_experts": 8, "expert_dims": [64], "tower_dims": [32]}),
    "CGC": ("cgc", {"num_shared_experts": 2, "num_task_experts": 2, "expert_dims": [64], "tower_dims": [32]}),
    "PLE": (
        "ple",
        {
            "num_levels": 2,
            "num_shared_experts": 2,
            "num_task_experts": 2,
            "expert_dims": [64],
            "tower_dims": [32],
        },
    ),
    "HoME": (
        "home",
        {
            "categories": {"income": "income", "never_married": "marital"},
            "expert_dims": [64],
            "tower_dims": [32],
        },
    ),
    "DSelect-k": ("dselect_k", {"num_experts": 8, "k": 2, "expert_dims": [64], "tower_dims": [32]}),
}
METHODS: dict[str, tuple[str, dict]] = {"EW": ("ew", {}), "UPGrad": ("upgrad", {})}
STL = ("shared_bottom", {"bottom_dims": [128, 64], "tower_dims": [32]})


def _job(args: tuple) -> dict:
    kind, label, method, seed, epochs = args
    import torch

    torch.set_num_threads(1)
    import mtlkit as mk

    dataset = mk.data.load_census_income(seed=seed)
    if kind == "stl":
        tasks = mk.TaskSet([dataset.tasks[label.removeprefix("stl-")]])
        name, options = STL
        m_name, m_options = "ew", {}
    else:
        tasks = dataset.tasks
        name, options = MODELS[label]
        m_name, m_options = METHODS[method]
    torch.manual_seed(seed)
    model = mk.models.create(name, in_features=dataset.in_features, tasks=tasks, **copy.deepcopy(options))
    # validation every epoch; the best epoch (lowest summed validation loss) is kept for the
    # second protocol, without stopping early
    stopper = mk.train.EarlyStopping("loss", patience=epochs, restore_best=False)
    trainer = mk.Trainer(
        model,
        tasks,
        mk.methods.create(m_name, **copy.deepcopy(m_options)),
        torch.optim.Adam(model.parameters(), lr=1e-3),
        device="cpu",
        early_stopping=stopper,
        seed=seed,
        progress=False,
    )
    start = time.perf_counter()
    trainer.fit(
        mk.data.loader(dataset.train, 1024, shuffle=True), mk.data.loader(dataset.val, 8192), epochs=epochs
    )
    seconds = time.perf_counter() - start
    test = mk.data.loader(dataset.test, 8192)
    last = trainer.evaluate(test).metrics
    assert stopper.best_weights is not None
    trainer.load_model_tensors(stopper.best_weights, "best weights")
    best = trainer.evaluate(test).metrics
    return {
        "kind": kind,
        "label": label,
        "method": method,
        "seed": seed,
        "metrics": last,
        "best_metrics": best,
        "best_epoch": stopper.best_epoch,
        "seconds": seconds,
        "epochs": epochs,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, default=None, help="re-render a saved run's table")
    args = parser.parse_args()
    tasks = ["income", "never_married"]
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        results, wall, load = saved["results"], saved["wall_s"], saved.get("load")
    else:
        import os

        jobs = [("stl", f"stl-{t}", "-", s, args.epochs) for s in args.seeds for t in tasks]
        jobs += [
            ("mtl", m, meth, s, args.epochs) for s in args.seeds for meth in args.methods for m in args.models
        ]
        start = time.perf_counter()
        with mp.get_context("spawn").Pool(args.workers) as pool:
            results = pool.map(_job, jobs, chunksize=1)
        wall = time.perf_counter() - start
        load = os.getloadavg()
    text = report(results, args, tasks, wall, load)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        payload = {"results": results, "wall_s": wall, "load": load}
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))


def table(results: list[dict], args, tasks: list[str], key: str) -> list[str]:
    """One Markdown table of ``key`` (``"metrics"``: last epoch; ``"best_metrics"``: the epoch with
    the lowest summed validation loss)."""
    from mtlkit.metrics import delta_m

    stl = {
        s: {t: r[key][t] for r in results if r["kind"] == "stl" and r["seed"] == s for t in r[key]}
        for s in args.seeds
    }
    dirs = {t: {"auc": True} for t in tasks}
    rows: dict[tuple[str, str], list] = {}
    for r in results:
        if r["kind"] != "mtl":
            continue
        dm = delta_m(
            {t: {"auc": r[key][t]["auc"]} for t in tasks},
            {t: {"auc": stl[r["seed"]][t]["auc"]} for t in tasks},
            dirs,
        )
        rows.setdefault((r["label"], r["method"]), []).append((r, dm))

    best = key == "best_metrics"
    head = "| model | method | params | " + " | ".join(f"{t} AUC" for t in tasks) + " | Δm% (↑) |"
    head += " best epochs |" if best else " s / epoch |"
    lines = [head, "|" + "---|" * (len(tasks) + 5)]
    stl_runs = [r for r in results if r["kind"] == "stl"]
    ref_auc = {t: [stl[s][t]["auc"] for s in args.seeds] for t in tasks}
    stl_params = "+".join(f"{r['params']:,}" for r in stl_runs if r["seed"] == args.seeds[0])
    extra = (
        " ".join(str(r["best_epoch"]) for r in stl_runs)
        if best
        else f"{statistics.mean(r['seconds'] / r['epochs'] for r in stl_runs):.1f} (each)"
    )
    lines.append(
        f"| single-task SharedBottom | EW | {stl_params} | "
        + " | ".join(mean_sd(ref_auc[t], ".4f") for t in tasks)
        + f" | 0 | {extra} |"
    )
    for method in args.methods:
        for label in args.models:
            runs = rows[(label, method)]
            aucs = " | ".join(mean_sd([r[key][t]["auc"] for r, _ in runs], ".4f") for t in tasks)
            extra = (
                " ".join(str(r["best_epoch"]) for r, _ in runs)
                if best
                else f"{statistics.mean(r['seconds'] / r['epochs'] for r, _ in runs):.1f}"
            )
            lines.append(
                f"| {label} | {method} | {runs[0][0]['params']:,} | {aucs} | {mean_sd([d for _, d in runs], '+.3f')} | {extra} |"
            )
    return lines


def report(results: list[dict], args, tasks: list[str], wall: float, load) -> str:
    load_text = f"; load average at the end {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}" if load else ""
    setup = (
        f"Census-Income (KDD), test split, tasks income and never_married (Ma et al. 2018, group 1), "
        f"Adam 1e-3, batch 1024, {args.epochs} epochs, seeds {args.seeds} (mean ± sd over seeds; "
        "each seed's Δm% is against that seed's single-task SharedBottom models, AUC only, "
        "Maninis et al. 2019; positive = better). Architectures as in `MODELS` of the script "
        "(every expert [64], towers [32]; HoME with one category per task). Wall time per epoch "
        f"with {args.workers} workers of one thread each on a 2-core machine (total "
        f"{wall / 60:.1f} min{load_text}). ESMM/AITM are not run: the tasks are not a conversion funnel."
    )
    return "\n".join(
        [
            "# Architectures on Census-Income",
            "",
            setup,
            "",
            "## The model after the last epoch (no model selection)",
            "",
            *table(results, args, tasks, "metrics"),
            "",
            "## The model of the epoch with the lowest summed validation loss",
            "",
            "Every run trains all epochs; the weights of its best validation epoch (1-based epochs listed per seed) are evaluated on the test split, single-task baselines included.",
            "",
            *table(results, args, tasks, "best_metrics"),
            "",
        ]
    )


if __name__ == "__main__":
    main()
